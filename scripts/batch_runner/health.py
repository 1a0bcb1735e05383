"""A worker's server health: a server that does not answer (refused, or silent for --server-timeout) is dropped, its
jobs go back in the queue, and it is probed until it answers again. A mixin of Worker (worker.py)."""
from __future__ import annotations

import time

from comfy_server import ComfyServerError

from .common import is_network_error, refused


class OddAnswer(Exception):
    """A server-wide endpoint (/queue) answered with something ComfyUI never sends: counted like no answer, so a
    server that keeps doing it is dropped after --server-timeout, one that did it once is not."""


class Health:
    """Worker's health methods (they use its client, runner, slots, lock)."""

    def queue_state(self, timeout: float | None = None) -> tuple[list[str], list[str]]:
        """The server's (running, pending) prompt ids; an answer of another shape raises OddAnswer."""
        try:
            running, pending = self.client.queue_state(timeout=timeout or self.runner.http_timeout)
            if all(isinstance(i, str) for i in running + pending):
                return running, pending
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise OddAnswer(f"{self.client.url} answered /queue with something else than a queue "
                            f"({type(e).__name__})") from None
        raise OddAnswer(f"{self.client.url} answered /queue with prompt ids that are not text")

    def trouble(self, e: BaseException):
        t = time.monotonic()
        if refused(e):
            self.die("connection refused")
            return
        self.failing_since = self.failing_since or t
        if t - self.failing_since >= self.runner.server_timeout:
            self.die(f"no answer for {self.runner.server_timeout:.0f}s ({getattr(e, 'reason', e)})")
        else:
            time.sleep(0.5)

    def die(self, reason: str):
        if not self.alive:
            return
        self.alive, self.reason = False, reason
        self.next_probe = time.monotonic() + 2.0
        if self.events is not None:
            self.events.close()
            self.events = None
        with self.lock:
            slots = list(self.slots.values())
            self.slots.clear()
        self.abandoned += [s.prompt_id for s in slots]
        back = []
        for s in slots:
            if s.started_m is not None:
                s.job.attempts += 1
            if s.job.attempts >= self.runner.max_attempts:
                self.runner.record(s.job, self, s, "failed", error=f"{s.job.attempts} server(s) stopped answering while "
                                   f"running it (last: {self.client.url}, {reason}); it may be what brings them down")
            else:
                back.append(s.job)
        self.runner.requeue(back)
        self.runner.progress.note(f"{self.label} {self.client.url} is down ({reason}): "
                                  f"{len(back)} job(s) back in the queue")

    def probe(self):
        if time.monotonic() < self.next_probe or self.runner.stop_mode is not None:
            return
        self.next_probe = time.monotonic() + 5.0
        try:
            self.client._check_alive("")
            self.client.get_json("/system_stats", timeout=5)
        except Exception as e:
            if is_network_error(e) or isinstance(e, (ComfyServerError, OSError)):
                return
            raise
        try:
            self.client.cancel(self.abandoned, timeout=5)  # if it only hung, don't let it run what others took over
        except Exception:
            pass
        self.abandoned, self.uploads = [], {}  # a restarted server may have a fresh input folder
        self.alive, self.failing_since, self.next_poll = True, None, 0.0
        self.runner.progress.note(f"{self.label} {self.client.url} is back")
