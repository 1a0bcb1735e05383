"""One server: keeps up to --per-server prompts queued on it, follows its websocket (or polls), collects results, and
notices when it goes away. A job's bad value or an answer it cannot read fails that job; only a server that does not
answer is dropped."""
from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING

from comfy_server import ComfyClient, ComfyServerError

from .common import describe_error, is_network_error, now_iso, one_line
from .handover import Handover
from .health import Health, OddAnswer
from .jobs import Job, slug

if TYPE_CHECKING:
    from .runner import Runner


class Slot:
    """A job queued on one server."""

    def __init__(self, job: Job, prompt_id: str):
        self.job, self.prompt_id = job, prompt_id
        self.queued, self.queued_m = now_iso(), time.monotonic()
        self.started_m = None  # when it began executing (websocket or /queue)
        self.finished = False  # the websocket said it ended: fetch its history
        self.missing = 0  # polls that found it nowhere (a restarted server, a cleared queue)
        self.stealing = False
        self.node = None
        self.step = None


class Worker(Health, Handover, threading.Thread):
    """Feeds one server: keeps up to per_server prompts queued on it, follows its websocket, collects results."""

    def __init__(self, runner: "Runner", client: ComfyClient, name: str):
        super().__init__(name=f"batch-{name}", daemon=True)
        self.runner, self.client, self.label = runner, client, name
        self.slots: dict[str, Slot] = {}
        self.lock = threading.Lock()
        self.alive = True
        self.reason = ""
        self.failing_since = None
        self.events = None
        self.ws_retry = 0.0
        self.next_poll = 0.0
        self.next_probe = 0.0
        self.next_steal = 0.0
        self.uploads: dict = {}
        self.abandoned: list[str] = []
        self.done = 0
        self.drained = False

    # ---- status
    def describe(self) -> str:
        if not self.alive:
            return f"{self.label} DOWN"
        with self.lock:
            slots = list(self.slots.values())
        running = [s for s in slots if s.started_m and not s.finished]
        if not slots:
            return f"{self.label} idle ({self.done} done)"
        if not running:
            return f"{self.label} {len(slots)} queued ({self.done} done)"
        s = running[0]
        node = ""
        if s.node is not None:
            node = f" {self.runner.node_name(s.node)}"
            if s.step:  # a sampler's progress: its step, not a count under the node's title
                node += f" step {s.step[0]}/{s.step[1]}"
        # the state first, the job id last: on a narrow terminal the cut takes the id, not the state
        return f"{self.label}{node} (+{len(slots) - 1} queued, {self.done} done) {s.job.id}"

    # ---- main loop
    def run(self):
        try:
            while not self.runner.finished:
                if not self.alive:
                    self.probe()
                    time.sleep(0.2)
                    continue
                try:
                    self.step_once()
                except ComfyServerError as e:  # a server this process started has exited
                    self.die(one_line(e).split(". Last lines")[0])
                except OddAnswer as e:  # its /queue or /system_stats is not what ComfyUI answers: as if no answer
                    self.trouble(e)
                except Exception as e:
                    if not is_network_error(e):
                        raise
                    self.trouble(e)
            self.leave()
        except BaseException as e:  # a bug here must not leave jobs stranded: hand them back and report it
            self.runner.progress.note(f"{self.label}: internal error {type(e).__name__}: {e}")
            self.die(f"internal error {type(e).__name__}")

    def step_once(self):
        self.client._check_alive("during the batch")
        mode = self.runner.stop_mode
        if mode == "drain" and not self.drained:
            self.take_back(started=False)
            self.drained = True
        if mode is None:
            self.fill()
        self.pump_events(0.2)
        self.poll()

    def fill(self):
        while self.alive and self.runner.stop_mode is None:
            with self.lock:
                if len(self.slots) >= self.runner.per_server:
                    return
                empty = not self.slots
            job = self.runner.take()
            if job is None and empty and time.monotonic() >= self.next_steal:
                self.next_steal = time.monotonic() + 1.0
                job = self.runner.steal(self)
            if job is None:
                return
            self.submit(job)

    def upload(self, path: str) -> str:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self.uploads:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:12]
            stem, ext = os.path.splitext(os.path.basename(path))
            # the content's hash in the name: the same file uploads to the same name, a different one never collides
            name = self.client.upload_image(path, name=f"{slug(stem, 40) or 'image'}_{digest}{ext}")
            if not isinstance(name, str) or not name:
                raise ComfyServerError(f"{self.client.url} answered the upload of {path} without a file name.")
            self.uploads[key] = name
        return self.uploads[key]

    def submit(self, job: Job):
        prompt = copy.deepcopy(self.runner.workflow)
        slot = Slot(job, uuid.uuid4().hex)
        try:
            for k, (nid, name, value) in enumerate(job.inputs):
                prompt[nid]["inputs"][name] = self.upload(value) if k in job.uploads else value
            with self.lock:
                self.slots[slot.prompt_id] = slot
            self.client.queue(prompt, prompt_id=slot.prompt_id)
        except Exception as e:
            with self.lock:
                self.slots.pop(slot.prompt_id, None)
            if is_network_error(e):
                self.abandoned.append(slot.prompt_id)  # it may have been queued after all: cancel it later
                self.runner.requeue([job])
                raise
            # the server rejected this job's prompt or upload, or answered in a way that cannot be read (an upload
            # answer without a name, say): this job's failure; the server stays in
            if not isinstance(e, ComfyServerError):
                self.abandoned.append(slot.prompt_id)  # an odd answer to /prompt may still have queued it
            self.runner.record(job, self, slot, "failed", error=describe_error(e))

    def pump_events(self, wait: float):
        if self.events is None and self.runner.use_ws and time.monotonic() >= self.ws_retry:
            try:
                self.events = self.client.events(timeout=5)
            except (OSError, ValueError):
                self.ws_retry = time.monotonic() + 5.0  # polling carries on meanwhile
        if self.events is None:
            time.sleep(wait if self.runner.use_ws else min(wait, 0.1))
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                ev = self.events.recv(timeout=max(0.0, deadline - time.monotonic()))
            except (ConnectionError, OSError):
                self.events.close()
                self.events = None
                self.next_poll = 0.0  # the socket dropped: ask the server now whether it is still there
                return
            if ev is None:
                return
            self.on_event(*ev)

    def on_event(self, kind: str, data: dict):
        if not isinstance(data, dict) or not isinstance(data.get("prompt_id"), str):
            return
        with self.lock:
            slot = self.slots.get(data["prompt_id"])
        if slot is None:
            return
        if not isinstance(data.get("node"), (str, int, type(None))):
            data = {**data, "node": str(data["node"])[:40]}  # only ever shown
        if kind in ("execution_start", "execution_cached") and slot.started_m is None:
            slot.started_m = time.monotonic()
        elif kind == "executing":
            if data.get("node") is None:  # the prompt is over
                slot.finished = True
            else:
                slot.started_m = slot.started_m or time.monotonic()
                slot.node, slot.step = data["node"], None
        elif kind == "progress":
            step = (data.get("value"), data.get("max"))
            slot.node = data.get("node", slot.node)
            slot.step = step if all(isinstance(v, int) for v in step) else None
        elif kind == "executed":
            slot.step = None
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            slot.finished = True

    def poll(self):
        t = time.monotonic()
        with self.lock:
            slots = list(self.slots.values())
        if not slots:
            if t >= self.next_poll:  # keep checking an idle server's health too
                self.next_poll = t + (2.0 if self.events else 0.5)
                try:
                    self.client.get_json("/system_stats", timeout=self.runner.http_timeout)
                except ValueError:
                    raise OddAnswer(f"{self.client.url} answered /system_stats with something else than JSON") from None
                self.failing_since = None
            return
        check = [s for s in slots if s.finished]
        if t >= self.next_poll:
            self.next_poll = t + (2.0 if self.events else 0.5)
            running, pending = self.queue_state()
            self.failing_since = None
            for s in slots:
                if s.prompt_id in running and s.started_m is None:
                    s.started_m = t
                if s.prompt_id not in running and s.prompt_id not in pending and not s.stealing and s not in check:
                    check.append(s)
        for s in check:
            try:
                entry = self.client.get_json(f"/history/{s.prompt_id}", timeout=self.runner.http_timeout)
                entry = entry.get(s.prompt_id) if isinstance(entry, dict) else entry
                if not isinstance(entry, (dict, type(None))):
                    raise ComfyServerError(f"{self.client.url} answered /history/{s.prompt_id} with "
                                           f"{type(entry).__name__}, not a history entry.")
            except Exception as e:  # the server's odd answer about this prompt fails this job, not the server
                if is_network_error(e):
                    raise
                with self.lock:
                    gone = self.slots.pop(s.prompt_id, None)
                if gone is not None:
                    self.runner.record(s.job, self, s, "failed", error=describe_error(e))
                continue
            if entry is not None:
                self.collect(s, entry)
            elif not s.finished:
                s.missing += 1
                if s.missing >= 3:  # in no queue and no history: the server restarted or someone cleared the queue
                    with self.lock:
                        gone = self.slots.pop(s.prompt_id, None)
                    if gone is not None:
                        self.runner.progress.note(f"{self.label}: {s.job.id} vanished from the server's queue; queued again")
                        self.runner.requeue([s.job])
        for s in slots:
            if s.started_m and t - s.started_m > self.runner.timeout and s.prompt_id in self.slots:
                with self.lock:
                    self.slots.pop(s.prompt_id, None)
                self.runner.record(s.job, self, s, "failed", error=f"did not finish within --timeout "
                                   f"{self.runner.timeout:.0f}s on {self.client.url}; interrupted")
                try:  # recorded first: a server that stops answering here cannot strand the job
                    self.client.cancel([s.prompt_id])
                    self.client.interrupt(s.prompt_id)
                except Exception as e:
                    if is_network_error(e):
                        raise

    def collect(self, slot: Slot, entry: dict):
        with self.lock:
            if self.slots.pop(slot.prompt_id, None) is None:
                return
        try:
            self.client.check_entry(slot.prompt_id, entry)
            result = self.runner.collector(slot.job, self.client, entry)
        except Exception as e:
            if is_network_error(e):  # the outputs could not be fetched: run the job again elsewhere
                self.runner.requeue([slot.job])
                raise
            # the prompt failed, or its history entry or outputs cannot be used (a file name the runner refuses,
            # an entry of another shape): this job's failure
            self.runner.record(slot.job, self, slot, "failed", error=describe_error(e))
            return
        self.done += 1
        self.runner.record(slot.job, self, slot, "done", result=result)
