"""Handing a worker's jobs back: on Ctrl-C (not started ones back to the batch queue; the running one interrupted on a
second Ctrl-C), to an idle server (work stealing), and when the batch ends. A mixin of Worker (worker.py)."""
from __future__ import annotations

from .jobs import Job


class Handover:
    """Worker's handover methods (they use its client, runner, slots, lock)."""

    def take_back(self, started: bool):
        """Stop mode: un-queue the jobs not started (back to the batch queue); with started=True also interrupt the
        running one and drop it (it is not recorded, a rerun does it)."""
        with self.lock:
            slots = list(self.slots.values())
        for s in slots:
            if s.started_m is not None and not started:
                continue
            try:
                self.client.cancel([s.prompt_id], timeout=5)
                if started:
                    self.client.interrupt(s.prompt_id, timeout=5)
                else:
                    running, pending = self.client.queue_state(timeout=5)
                    if s.prompt_id in running or self.client.history(s.prompt_id, timeout=5) is not None:
                        continue  # it started meanwhile: let it finish
            except Exception:
                if not started:
                    continue
            with self.lock:
                if self.slots.pop(s.prompt_id, None) is not None:
                    self.runner.requeue([s.job])

    def steal_one(self) -> Job | None:
        """Give a queued, not started job to an idle server: removed from this server's queue, checked gone."""
        with self.lock:
            if not self.alive:
                return None
            cands = [s for s in self.slots.values() if s.started_m is None and not s.finished and not s.stealing]
            if not cands:
                return None
            s = cands[-1]
            s.stealing = True
        try:
            running, pending = self.client.queue_state(timeout=5)
            if s.prompt_id not in pending or not running:
                return None  # only a job waiting behind another: one about to start would just bounce between servers
            self.client.cancel([s.prompt_id], timeout=5)
            # a prompt is always in exactly one of pending / running / history; in none: the delete took it
            running, pending = self.client.queue_state(timeout=5)
            if s.prompt_id in running or s.prompt_id in pending or \
                    self.client.history(s.prompt_id, timeout=5) is not None:
                return None
        except Exception:
            return None
        finally:
            s.stealing = False
        with self.lock:
            if self.slots.pop(s.prompt_id, None) is None:
                return None
        return s.job

    def leave(self):
        """The batch is over (or stopped at once): nothing of ours stays queued or running on the server."""
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.alive and self.slots:
            try:
                self.take_back(started=True)
            except Exception:
                pass
