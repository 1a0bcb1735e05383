"""The batch over the servers: the shared queue (work stealing between workers), each job's manifest record, the
run loop, Ctrl-C."""
from __future__ import annotations

import collections
import signal
import threading
import time

from comfy_server import ComfyClient

from .common import BatchError, now_iso, one_line
from .jobs import Job
from .progress import Progress
from .worker import Slot, Worker
from .workflow import workflow_hash


class Runner:
    """Runs jobs over the workers' servers until every job is recorded, the user stops it, or no server is left."""

    def __init__(self, workflow: dict, jobs: list[Job], clients: list[ComfyClient], *, collector, manifest=None,
                 per_server: int = 2, timeout: float = 600.0, server_timeout: float = 60.0, max_attempts: int = 3,
                 use_ws: bool = True, on_record=None, progress: Progress | None = None, http_timeout: float = 30.0):
        if per_server < 1:
            raise BatchError("--per-server must be at least 1.")
        repeated = [k for k, n in collections.Counter(j.id for j in jobs).items() if n > 1]
        if repeated:  # each job is recorded once: a repeated id would wait forever for its second record
            raise BatchError(f"Job ids repeat: {', '.join(repeated[:5])}; every job needs its own id.")
        self.workflow, self.jobs, self.collector, self.manifest = workflow, jobs, collector, manifest
        self.per_server, self.timeout, self.server_timeout = per_server, timeout, server_timeout
        self.max_attempts, self.use_ws, self.on_record, self.http_timeout = max_attempts, use_ws, on_record, http_timeout
        self.progress = progress or Progress(len(jobs), quiet=True)
        self.pending = collections.deque(jobs)
        self.lock = threading.RLock()
        self.recorded: dict[str, str] = {}
        self.stop_mode = None  # None, "drain" (first Ctrl-C), "now" (second)
        self.finished = False
        self.gave_up = False
        self.workflow_hash = workflow_hash(workflow)
        self.workers = [Worker(self, c, f"s{i + 1}") for i, c in enumerate(clients)]

    def node_name(self, node_id) -> str:
        """How the display names a node: its class, and its title when that says something else ('KSampler 'seed'')."""
        node = self.workflow.get(str(node_id))
        if not isinstance(node, dict):
            return f"node {str(node_id)[:40]}"
        kind, title = str(node.get("class_type") or f"node {node_id}"), (node.get("_meta") or {}).get("title")
        return f"{kind} '{title}'" if isinstance(title, str) and title.strip() and title != kind else kind

    # ---- the shared queue
    def take(self) -> Job | None:
        with self.lock:
            while self.pending and self.stop_mode is None:
                job = self.pending.popleft()
                if job.id not in self.recorded:
                    return job
            return None

    def steal(self, thief: Worker) -> Job | None:
        with self.lock:
            if self.pending or self.stop_mode is not None:
                return None
        victims = sorted((w for w in self.workers if w is not thief and w.alive),
                         key=lambda w: -sum(1 for s in list(w.slots.values()) if s.started_m is None))
        for victim in victims:
            job = victim.steal_one()
            if job is not None:
                self.progress.note(f"{thief.label} took {job.id} over from {victim.label}")
                return job
        return None

    def requeue(self, jobs):
        with self.lock:
            for job in reversed(list(jobs)):
                if job.id not in self.recorded:
                    self.pending.appendleft(job)  # first in line: they waited longest

    def record(self, job: Job, worker: Worker, slot: Slot | None, status: str, result: dict | None = None,
               error: str | None = None) -> bool:
        """The job's manifest line, once: a job that somehow finished twice is recorded the first time only."""
        t = time.monotonic()
        with self.lock:
            if job.id in self.recorded:
                return False
            rec = {"job": job.id, "status": status, "values": job.values, "server": worker.client.url,
                   "prompt_id": slot.prompt_id if slot else None, "attempts": job.attempts + 1,
                   "queued": slot.queued if slot else None, "finished": now_iso(),
                   "wait_s": round(slot.started_m - slot.queued_m, 3) if slot and slot.started_m else None,
                   "run_s": round(t - slot.started_m, 3) if slot and slot.started_m else None,
                   "total_s": round(t - slot.queued_m, 3) if slot else None,
                   "outputs": [], "error": None, "workflow": self.workflow_hash}
            if result:
                rec.update(result)
            if error:
                rec["error"] = error
            if self.manifest is not None:
                try:  # values or outputs strict JSON cannot hold are written as text by Manifest.append
                    self.manifest.append(rec)
                except OSError as e:  # a full disk, say: nothing more can be recorded, so nothing more runs
                    self.stop_mode = "now"
                    self.progress.note(f"error: cannot write {self.manifest.path} ({e}); stopping")
            self.recorded[job.id] = status
            if status == "done":
                self.progress.done += 1
            else:
                self.progress.failed += 1
            if self.on_record is not None:
                self.on_record(job, rec)
            else:
                took = f" in {rec['total_s']:.1f}s" if rec["total_s"] is not None else ""
                if status == "done":
                    self.progress.note(f"done {job.id} on {worker.label}{took}: {len(rec['outputs'])} file(s)")
                else:
                    self.progress.note(f"FAILED {job.id} on {worker.label}: {one_line(error)}")
            return True

    def record_not_run(self):
        """No server left: the jobs not run get a line too (status not_run, which a rerun runs), so the manifest
        accounts for every job of the batch."""
        reasons = "; ".join(f"{w.client.url}: {w.reason}" for w in self.workers) or "no server"
        with self.lock:
            for job in self.jobs:
                if job.id in self.recorded:
                    continue
                rec = {"job": job.id, "status": "not_run", "values": job.values, "server": None, "prompt_id": None,
                       "attempts": job.attempts, "queued": None, "finished": now_iso(), "wait_s": None, "run_s": None,
                       "total_s": None, "outputs": [], "error": f"no server left ({reasons})",
                       "workflow": self.workflow_hash}
                if self.manifest is not None:
                    try:
                        self.manifest.append(rec)
                    except OSError:
                        return
                self.recorded[job.id] = "not_run"

    # ---- run
    def _signal(self, signum, frame):
        if signum == signal.SIGINT and self.stop_mode is None:
            self.stop_mode = "drain"
            self.progress.note("stopping: no new jobs; queued ones are taken back, running ones finish and are "
                               "recorded (Ctrl-C again to interrupt them)")
        else:
            self.stop_mode = "now"
            self.progress.note("stopping now: running jobs are interrupted and not recorded (a rerun does them)")

    def run(self) -> dict:
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._signal)
        started = time.monotonic()
        all_down_since = None
        try:
            for w in self.workers:
                w.start()
            while True:
                with self.lock:
                    left = len(self.jobs) - len(self.recorded)
                in_flight = sum(len(w.slots) for w in self.workers)
                if left == 0 or self.stop_mode == "now" or (self.stop_mode == "drain" and in_flight == 0
                                                           and all(w.drained or not w.alive for w in self.workers)):
                    break
                if not any(w.alive for w in self.workers):
                    all_down_since = all_down_since or time.monotonic()
                    if time.monotonic() - all_down_since > self.server_timeout:
                        self.gave_up = True
                        break
                else:
                    all_down_since = None
                self.progress.render(self.workers)
                time.sleep(0.25)
        finally:
            self.finished = True
            for w in self.workers:
                if w.is_alive():
                    w.join(30)
            self.progress.close(self.workers)
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if self.gave_up:
            self.record_not_run()
        statuses = collections.Counter(self.recorded.values())
        return {"jobs": len(self.jobs), "done": statuses["done"], "failed": statuses["failed"],
                "not_run": len(self.jobs) - statuses["done"] - statuses["failed"], "seconds": time.monotonic() - started,
                "stopped": self.stop_mode, "gave_up": self.gave_up}

