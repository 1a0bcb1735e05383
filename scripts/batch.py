"""Batch runner over ComfyUI's HTTP API: many jobs (references x prompts x seeds, or a CSV/JSONL table) through one
API-format workflow, spread over one or more ComfyUI servers the user already runs; resumable through a results
manifest. Standard library only, like comfy_server.py (the one HTTP + websocket client it uses).

    python scripts/batch.py WORKFLOW_API.json --out results/ --url http://127.0.0.1:8188 --url http://127.0.0.1:8189 \\
        --refs faces/ --prompts prompts.txt --seeds 4 [--seed 0]        # cross product: reference x prompt x seed
    python scripts/batch.py WORKFLOW_API.json --out results/ --url ... --jobs jobs.csv   # or jobs.jsonl

Jobs set node inputs addressed as TITLE.INPUT: the node's title (exact, case-insensitive; else a node id, else a
class type: every node it names), a dot, the input name, e.g. `prompt.text`, `seed.seed`, `IDFusion Apply.weight`.
A table has one column (CSV) or key (JSONL) per address and an optional `id`; empty cells keep the workflow's value.
For an image-upload input (LoadImage's `image`) a local file path (relative to the table's folder) is uploaded to
each server with POST /upload/image; any other value is taken as a file already in the server's input folder.
The cross product uses --ref-input / --prompt-input / --seed-input (default reference.image, prompt.text, seed.seed;
`seed` also matches a `noise_seed` input). --set ADDR=VALUE changes the workflow for every job.

Distribution: each server gets at most --per-server prompts at a time (one running, the next queued, so it never
waits for this client); a server with nothing left to do takes a queued-but-not-started prompt back from a busier
one (work stealing). A server that stops answering (connection refused, or no answer for --server-timeout seconds)
is dropped and its jobs go back in the queue for the others; it rejoins if it comes back. A job whose server died
while running it --max-attempts times fails (it may be what kills them). Per-server status comes from each server's
websocket (progress / executing / executed); without it (--no-websocket, or a proxy that blocks it) /queue and
/history are polled.

Results: --manifest (default OUT/manifest.jsonl) gets one JSON line per finished job, appended with one write and
fsync: job id, status (done / failed), values, server, prompt id, times, output files (downloaded with GET /view to
OUT/<job id>/<node id>_<k>.<ext>) and the error. A rerun with the same manifest skips the jobs it lists (failed ones
too, unless --retry-failed). Ctrl-C once: no new jobs, queued ones are taken back, running ones finish and are
recorded; twice: running ones are interrupted and left out. Exit status: 0 all done, 1 some failed, 2 stopped
(bad input, no server left), 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import copy
import csv
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import comfy_server  # noqa: E402
from comfy_server import ComfyClient, ComfyServerError, write_atomic  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UPLOAD_CLASSES = {("LoadImage", "image"), ("LoadImageMask", "image")}  # when /object_info does not say image_upload


class BatchError(Exception):
    """Something the user can fix before any job runs: printed as one message, no traceback."""


def is_network_error(e: BaseException) -> bool:
    """The server did not answer (refused, reset, timed out); an HTTP error status is an answer, not this."""
    if isinstance(e, urllib.error.HTTPError):
        return False
    return isinstance(e, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                          http.client.HTTPException))


def refused(e: BaseException) -> bool:
    """Nothing listens at the address: the server is gone, not busy."""
    return isinstance(getattr(e, "reason", e), ConnectionRefusedError)


def one_line(error) -> str:
    """An error without the server's traceback, on one line."""
    text = str(error).split("\nServer traceback:")[0]
    return " ".join(l.strip() for l in text.splitlines() if l.strip())


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


# ---------------------------------------------------------------------------------------------- workflow and jobs

def load_api_workflow(path: str) -> dict:
    """The API-format workflow; a UI-format file (the editor's Save) is refused with how to export the right one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise BatchError(f"Cannot read workflow {path}: {e.strerror}.") from None
    except ValueError as e:
        raise BatchError(f"Workflow {path} is not JSON ({e}).") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise BatchError(f"{path} is a UI-format workflow (what the editor's Save writes: nodes, links, widget values). "
                         f"The batch runner needs the API format: in ComfyUI use Workflow > Export (API) (older "
                         f"menus: Save (API), with the dev mode setting on) and pass that file.")
    try:
        return comfy_server.load_workflow(path)
    except ComfyServerError as e:
        raise BatchError(str(e)) from None


def input_spec(info: dict | None, class_type: str, name: str):
    """The input's spec from /object_info ([type or combo list, options]), or None if unknown."""
    node = (info or {}).get(class_type) or {}
    for group in ("required", "optional"):
        spec = (node.get("input") or {}).get(group, {}).get(name)
        if spec is not None:
            return spec
    return None


def is_upload_input(info: dict | None, class_type: str, name: str) -> bool:
    spec = input_spec(info, class_type, name)
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("image_upload")) or (class_type, name) in UPLOAD_CLASSES


def resolve(workflow: dict, info: dict | None, address: str, where: str) -> list[tuple[str, str]]:
    """TITLE.INPUT -> [(node id, input name), ...]; raises naming the address and what exists."""
    title, dot, name = address.strip().rpartition(".")
    if not dot or not title.strip() or not name:
        raise BatchError(f"{where}: '{address}' is not TITLE.INPUT (a node's title, a dot, one of its inputs), "
                         f"e.g. 'KSampler.seed' or 'prompt.text'.")
    key = title.strip().lower()
    nodes = [nid for nid, n in workflow.items() if str((n.get("_meta") or {}).get("title", "")).strip().lower() == key]
    if not nodes and title.strip() in workflow:
        nodes = [title.strip()]
    if not nodes:
        nodes = [nid for nid, n in workflow.items() if n["class_type"].lower() == key]
    if not nodes:
        titles = sorted({str((n.get("_meta") or {}).get("title", "")) for n in workflow.values()} - {""})
        raise BatchError(f"{where}: no node of the workflow is titled '{title}' (nor has that id or class type). "
                         f"Titles: {', '.join(repr(t) for t in titles)}. Set a title in ComfyUI (right-click the node "
                         f"> Title) and export with Save (API).")
    out = []
    for nid in sorted(nodes, key=lambda k: (len(k), k)):
        node, n = workflow[nid], name
        if n == "seed" and n not in node["inputs"] and "noise_seed" in node["inputs"]:
            n = "noise_seed"  # KSamplerAdvanced and friends
        if n not in node["inputs"] and input_spec(info, node["class_type"], n) is None:
            known = sorted(set(node["inputs"]) | {k for g in ("required", "optional") for k in
                                                   (((info or {}).get(node["class_type"]) or {}).get("input") or {}).get(g, {})})
            raise BatchError(f"{where}: node {nid} ({node['class_type']}) has no input '{name}'. "
                             f"Its inputs: {', '.join(known)}.")
        out.append((nid, n))
    return out


def coerce(value, spec, where: str):
    """A table cell (text in CSV) as the type the input takes (INT, FLOAT, BOOLEAN; everything else as text)."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if not isinstance(value, str) or not isinstance(kind, str):
        return value
    text = value.strip()
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
    except ValueError:
        raise BatchError(f"{where}: '{value}' is not {'an integer' if kind == 'INT' else 'a number'} "
                         f"(the input is {kind}).") from None
    if kind == "BOOLEAN":
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise BatchError(f"{where}: '{value}' is not true or false (the input is BOOLEAN).")
    return value


def slug(text: str, n: int = 20) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n].strip("_")


def derive_id(values: dict) -> str:
    """A stable id from a job's values (a rerun with the same table finds it again), readable, with a short hash."""
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:8]
    parts = []
    for v in values.values():
        if isinstance(v, str) and v.lower().endswith(IMAGE_EXTS):
            v = os.path.splitext(os.path.basename(v))[0]
        parts.append(slug(str(v)))
    return "-".join([p for p in parts if p][:4] + [digest])


def job_dir_name(job_id: str) -> str:
    """The job's output folder: its id when that is a safe file name, else a safe form plus a hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job_id).lstrip(".")[:80] or "job"
    return safe if safe == job_id else f"{safe}-{hashlib.sha1(job_id.encode()).hexdigest()[:8]}"


class Job:
    """One prompt to run: `inputs` [(node id, input name, value)], `values` {address: value} for the manifest."""

    def __init__(self, job_id: str, index: int, values: dict, inputs: list, uploads: set | None = None, data=None):
        self.id, self.index, self.values, self.inputs = job_id, index, values, inputs
        self.uploads = uploads or set()  # positions in `inputs` that may be a local file to upload
        self.data = data  # whatever the caller attaches (face_benchmark: reference, prompt, seed)
        self.attempts = 0  # servers that died while running it

    def __repr__(self):
        return f"Job({self.id!r})"


def make_job(workflow, info, values: dict, index: int, where: str, base_dir: str = "", job_id: str | None = None) -> Job:
    inputs, uploads, clean = [], set(), {}
    for address, value in values.items():
        if value is None or (isinstance(value, str) and value == ""):
            continue  # an empty cell keeps the workflow's value
        for nid, name in resolve(workflow, info, address, where):
            node = workflow[nid]
            v = coerce(value, input_spec(info, node["class_type"], name), f"{where}, {address}")
            if is_upload_input(info, node["class_type"], name) and isinstance(v, str):
                local = v if os.path.isabs(v) else os.path.join(base_dir, v)
                if os.path.isfile(local):
                    v = os.path.abspath(local)
                    uploads.add(len(inputs))
            inputs.append((nid, name, v))
        clean[address] = value
    return Job(job_id or derive_id(clean), index, clean, inputs, uploads)


def read_table(path: str) -> list[tuple[str, dict]]:
    """[(where, {column: value})] from a CSV (header row) or JSONL (one object per line) file."""
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise BatchError(f"Cannot read --jobs {path}: {e.strerror}.") from None
    rows = []
    with f:
        if path.lower().endswith((".jsonl", ".ndjson")):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise BatchError(f"--jobs {path} line {n} is not JSON ({e}).") from None
                if not isinstance(row, dict):
                    raise BatchError(f"--jobs {path} line {n}: each line must be a JSON object of "
                                     f'{{"TITLE.INPUT": value, ...}}, optionally with "id".')
                rows.append((f"{path} line {n}", row))
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise BatchError(f"--jobs {path} is empty: the first row names the inputs (TITLE.INPUT columns, "
                                 f"optionally 'id').")
            for row in reader:
                if None in row:
                    raise BatchError(f"--jobs {path} line {reader.line_num} has more cells than the header.")
                if any((v or "").strip() for v in row.values()):
                    rows.append((f"{path} line {reader.line_num}", {k.strip(): v for k, v in row.items()}))
    if not rows:
        raise BatchError(f"--jobs {path} has no jobs.")
    return rows


def table_jobs(workflow, info, path: str) -> list[Job]:
    jobs, seen = [], {}
    base = os.path.dirname(os.path.abspath(path))
    for where, row in read_table(path):
        row = dict(row)
        job_id = row.pop("id", None)
        job_id = str(job_id).strip() if job_id not in (None, "") else None
        job = make_job(workflow, info, row, len(jobs), where, base, job_id)
        if job.id in seen:
            raise BatchError(f"{where} is the same job as {seen[job.id]} (id '{job.id}'): remove one, or give them "
                             f"different ids in an 'id' column.")
        seen[job.id] = where
        jobs.append(job)
    return jobs


def reference_images(folder: str, flag: str = "--refs", what: str = "images") -> list[str]:
    """The image files in a folder, sorted; `flag` names the option in errors (face_benchmark's is --faces)."""
    if not os.path.isdir(folder):
        raise BatchError(f"{flag} {folder} is not a folder.")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)
                   and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise BatchError(f"{flag} {folder} has no {what} ({' '.join(IMAGE_EXTS)}).")
    return files


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    except OSError as e:
        raise BatchError(f"Cannot read --prompts {path}: {e.strerror}.") from None
    prompts = list(dict.fromkeys(lines))  # a repeated prompt would only repeat its jobs
    if not prompts:
        raise BatchError(f"--prompts {path} has no prompts: one per line (blank lines and # comments are ignored).")
    return prompts


def cross_jobs(workflow, info, refs, prompts, seeds, ref_input, prompt_input, seed_input) -> list[Job]:
    """reference x prompt x seed, each dimension optional (None: the workflow's value)."""
    jobs = []
    for ref in refs or [None]:
        for prompt in prompts or [None]:
            for seed in seeds or [None]:
                values = {}
                if ref is not None:
                    values[ref_input] = ref
                if prompt is not None:
                    values[prompt_input] = prompt
                if seed is not None:
                    values[seed_input] = seed
                # the id from the reference's file name, not its path: the same folder given another way is the same job
                key = {**values, **({ref_input: os.path.basename(ref)} if ref is not None else {})}
                jobs.append(make_job(workflow, info, values, len(jobs), "job", job_id=derive_id(key)))
    return jobs


def apply_sets(workflow, info, sets) -> dict:
    """--set TITLE.INPUT=VALUE for every job."""
    wf = copy.deepcopy(workflow)
    for item in sets or []:
        address, eq, value = item.partition("=")
        if not eq:
            raise BatchError(f"--set {item}: write TITLE.INPUT=VALUE, e.g. --set KSampler.steps=8.")
        for nid, name in resolve(wf, info, address, f"--set {item}"):
            wf[nid]["inputs"][name] = coerce(value, input_spec(info, wf[nid]["class_type"], name), f"--set {item}")
    return wf


def workflow_hash(workflow: dict) -> str:
    return hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- manifest

class Manifest:
    """The results file: one JSON object per line, each appended with a single write and fsync, so a crash or
    Ctrl-C leaves whole lines (a torn last line, e.g. after a power cut, is ignored on reading). The last line of a job
    wins. Locked while a runner writes it, so two runs cannot interleave on one manifest."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self._fd = None
        self._need_newline = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            self._need_newline = bool(data) and not data.endswith(b"\n")
            lines = data.split(b"\n")
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.records[str(rec["job"])] = rec
                except (ValueError, KeyError, TypeError):
                    print(f"warning: {path} line {n} is not a whole record (an interrupted write?); ignored, its job "
                          f"runs again.", file=sys.stderr)

    def open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise BatchError(f"Another batch run is writing {self.path}; wait for it or use another --manifest.") from None

    def append(self, record: dict):
        if self._fd is None:
            raise BatchError(f"{self.path} is not open for writing")
        line = ("\n" if self._need_newline else "") + json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        written = os.write(self._fd, data)  # O_APPEND: one write, one whole line
        while written < len(data):  # only on a full disk or a signal mid-write; finish the line
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self._need_newline = False
        self.records[record["job"]] = record

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------- progress

def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line for the batch (bar, count, rate, ETA) and each server's state, redrawn in place on a terminal;
    elsewhere (a log file, CI) a plain line every `every` seconds. Job lines and notes go above it."""

    def __init__(self, total: int, stream=None, every: float = 10.0, quiet: bool = False, bar: bool = True):
        self.total, self.stream, self.every, self.quiet, self.bar = total, stream or sys.stderr, every, quiet, bar
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.done = self.failed = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._shown = False

    def line(self, workers) -> str:
        n = self.done + self.failed
        frac = n / self.total if self.total else 1.0
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        elapsed = time.monotonic() - self.start
        rate = n / elapsed if elapsed > 0 and n else 0.0
        eta = clock((self.total - n) / rate) if rate else "?"
        servers = " | ".join(w.describe() for w in workers)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{bar}] {n}/{self.total}{failed} {frac:4.0%} {rate * 60:.1f}/min elapsed {clock(elapsed)} "
                f"ETA {eta} | {servers}")

    def _write(self, text: str):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def render(self, workers, force: bool = False):
        if self.quiet or not self.bar:
            return
        with self._lock:
            t = time.monotonic()
            if self.tty:
                width = shutil.get_terminal_size((120, 20)).columns
                self._write("\r" + self.line(workers)[:width - 1] + "\x1b[K")
                self._shown = True
            elif force or t - self._last >= self.every:
                self._write(self.line(workers) + "\n")
                self._last = t

    def note(self, text: str):
        if self.quiet:
            return
        with self._lock:
            self._write(("\r\x1b[K" if self.tty and self._shown else "") + text + "\n")

    def close(self, workers):
        if self.quiet or not self.bar:
            return
        self.render(workers, force=True)
        if self.tty:
            self._write("\n")


# ---------------------------------------------------------------------------------------------- runner

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


class Worker(threading.Thread):
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
            node = f" {self.runner.class_of(s.node)}"
            if s.step:
                node += f" {s.step[0]}/{s.step[1]}"
        return f"{self.label} {s.job.id}{node} (+{len(slots) - 1} queued, {self.done} done)"

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
            self.uploads[key] = self.client.upload_image(path, name=f"{slug(stem, 40) or 'image'}_{digest}{ext}")
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
        except ComfyServerError as e:  # the server rejected this job's prompt or upload: its own error
            with self.lock:
                self.slots.pop(slot.prompt_id, None)
            self.runner.record(job, self, slot, "failed", error=str(e))
        except OSError as e:
            with self.lock:
                self.slots.pop(slot.prompt_id, None)
            if is_network_error(e):
                self.abandoned.append(slot.prompt_id)  # it may have been queued after all: cancel it later
                self.runner.requeue([job])
                raise
            self.runner.record(job, self, slot, "failed", error=f"{type(e).__name__}: {e}")

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
        if not isinstance(data, dict):
            return
        with self.lock:
            slot = self.slots.get(data.get("prompt_id"))
        if slot is None:
            return
        if kind in ("execution_start", "execution_cached") and slot.started_m is None:
            slot.started_m = time.monotonic()
        elif kind == "executing":
            if data.get("node") is None:  # the prompt is over
                slot.finished = True
            else:
                slot.started_m = slot.started_m or time.monotonic()
                slot.node, slot.step = data["node"], None
        elif kind == "progress":
            slot.node, slot.step = data.get("node", slot.node), (data.get("value"), data.get("max"))
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
                self.client.get_json("/system_stats", timeout=self.runner.http_timeout)
                self.failing_since = None
            return
        check = [s for s in slots if s.finished]
        if t >= self.next_poll:
            self.next_poll = t + (2.0 if self.events else 0.5)
            running, pending = self.client.queue_state(timeout=self.runner.http_timeout)
            self.failing_since = None
            for s in slots:
                if s.prompt_id in running and s.started_m is None:
                    s.started_m = t
                if s.prompt_id not in running and s.prompt_id not in pending and not s.stealing and s not in check:
                    check.append(s)
        for s in check:
            entry = self.client.history(s.prompt_id, timeout=self.runner.http_timeout)
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
                self.client.cancel([s.prompt_id])
                self.client.interrupt(s.prompt_id)
                self.runner.record(s.job, self, s, "failed", error=f"did not finish within --timeout "
                                   f"{self.runner.timeout:.0f}s on {self.client.url}; interrupted")

    def collect(self, slot: Slot, entry: dict):
        with self.lock:
            if self.slots.pop(slot.prompt_id, None) is None:
                return
        try:
            self.client.check_entry(slot.prompt_id, entry)
            result = self.runner.collector(slot.job, self.client, entry)
        except ComfyServerError as e:
            self.runner.record(slot.job, self, slot, "failed", error=str(e))
            return
        except OSError as e:
            if is_network_error(e):  # the outputs could not be fetched: run the job again elsewhere
                self.runner.requeue([slot.job])
                raise
            self.runner.record(slot.job, self, slot, "failed", error=f"{type(e).__name__}: {e}")
            return
        self.done += 1
        self.runner.record(slot.job, self, slot, "done", result=result)

    # ---- health
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

    # ---- taking jobs back
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


def download_outputs(out_dir: str):
    """The default collector: every output file of the prompt (SaveImage & co., type 'output') through GET /view into
    OUT/<job>/<node id>_<k><ext> (names that do not depend on the server's counter, so a rerun overwrites)."""
    def collect(job: Job, client: ComfyClient, entry: dict) -> dict:
        files, count = [], collections.Counter()
        for node_id, f in client.output_files(entry):
            ext = os.path.splitext(f["filename"])[1] or ".bin"
            rel = os.path.join(job_dir_name(job.id), f"{node_id}_{count[node_id]}{ext}")
            count[node_id] += 1
            write_atomic(os.path.join(out_dir, rel), client.view(f))
            files.append({"file": rel, "node": node_id,
                          "server_file": "/".join(p for p in (f.get("type") or "output", f.get("subfolder"), f["filename"]) if p)})
        return {"outputs": files}
    return collect


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

    def class_of(self, node_id) -> str:
        node = self.workflow.get(str(node_id)) or {}
        return (node.get("_meta") or {}).get("title") or node.get("class_type") or str(node_id)

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
                self.manifest.append(rec)
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
        statuses = collections.Counter(self.recorded.values())
        return {"jobs": len(self.jobs), "done": statuses["done"], "failed": statuses["failed"],
                "not_run": len(self.jobs) - len(self.recorded), "seconds": time.monotonic() - started,
                "stopped": self.stop_mode, "gave_up": self.gave_up}


# ---------------------------------------------------------------------------------------------- main

def connect(urls, node_types) -> tuple[list[ComfyClient], dict]:
    """A client per --url; /object_info from the ones that answer (one that does not is still used: it may come up
    later). A server without the workflow's nodes is left out."""
    clients, info = [], None
    for url in urls:
        try:
            client = ComfyClient(url)
        except ComfyServerError as e:
            raise BatchError(str(e)) from None
        try:
            oi = client.object_info()
        except Exception as e:
            if not is_network_error(e) and not isinstance(e, (OSError, ValueError)):
                raise
            print(f"warning: ComfyUI at {url} does not answer ({getattr(e, 'reason', e)}); it joins if it comes up.",
                  file=sys.stderr)
            clients.append(client)
            continue
        missing = sorted(set(node_types) - set(oi))
        if missing:
            print(f"warning: ComfyUI at {url} lacks the workflow's nodes {', '.join(missing)} (install the custom node "
                  f"packs that provide them there); not used.", file=sys.stderr)
            continue
        info = info or oi
        clients.append(client)
    if info is None:
        raise BatchError(f"No ComfyUI server with the workflow's nodes answers at {', '.join(urls)}. Start one "
                         f"(python main.py --listen --port N) and pass its address with --url.")
    return clients, info


def build_jobs(a, workflow, info) -> list[Job]:
    if a.jobs:
        if a.refs or a.prompts or a.seeds:
            raise BatchError("Use either --jobs TABLE or --refs/--prompts/--seeds, not both.")
        return table_jobs(workflow, info, a.jobs)
    if not (a.refs or a.prompts or a.seeds):
        raise BatchError("No jobs: pass --jobs TABLE (CSV or JSONL), or any of --refs DIR, --prompts FILE, --seeds N.")
    refs = reference_images(a.refs) if a.refs else None
    prompts = read_prompts(a.prompts) if a.prompts else None
    seeds = [a.seed + i for i in range(a.seeds)] if a.seeds else None
    return cross_jobs(workflow, info, refs, prompts, seeds, a.ref_input, a.prompt_input, a.seed_input)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run many jobs through one API-format ComfyUI workflow on one or more "
                                "servers; resumable through a JSONL manifest.")
    p.add_argument("workflow", help="API-format workflow (Workflow > Export (API))")
    p.add_argument("--url", action="append", help="a ComfyUI server; repeat for several (default http://127.0.0.1:8188)")
    p.add_argument("--out", required=True, help="folder for the outputs (OUT/<job id>/...) and the manifest")
    p.add_argument("--manifest", help="results JSONL (default OUT/manifest.jsonl); a rerun skips the jobs it lists")
    p.add_argument("--retry-failed", action="store_true", help="run the jobs the manifest lists as failed again")
    g = p.add_argument_group("jobs")
    g.add_argument("--jobs", help="CSV (header: TITLE.INPUT columns, optional id) or JSONL ({\"TITLE.INPUT\": value})")
    g.add_argument("--refs", help="folder of reference images: one job per image (x prompts x seeds)")
    g.add_argument("--prompts", help="text file, one prompt per line (# comments, blank lines ignored)")
    g.add_argument("--seeds", type=int, help="seeds per reference and prompt: --seed .. --seed+N-1")
    g.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    g.add_argument("--ref-input", default="reference.image", help="where --refs go (default: %(default)s)")
    g.add_argument("--prompt-input", default="prompt.text", help="where --prompts go (default: %(default)s)")
    g.add_argument("--seed-input", default="seed.seed", help="where seeds go (default: %(default)s; matches noise_seed too)")
    g.add_argument("--set", action="append", metavar="TITLE.INPUT=VALUE", help="change an input for every job")
    r = p.add_argument_group("distribution")
    r.add_argument("--per-server", type=int, default=2, help="prompts queued per server at a time (default: %(default)s)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds a job may run (default: %(default)s)")
    r.add_argument("--server-timeout", type=float, default=60.0,
                   help="seconds without an answer before a server's jobs go elsewhere (default: %(default)s)")
    r.add_argument("--max-attempts", type=int, default=3, help="servers that may die running one job before it counts "
                   "as failed (default: %(default)s)")
    r.add_argument("--no-websocket", action="store_true", help="poll /queue and /history instead of the websocket")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    if a.seeds is not None and a.seeds < 1:
        p.error("--seeds must be at least 1")
    urls = a.url or ["http://127.0.0.1:8188"]
    manifest = None
    try:
        workflow = load_api_workflow(a.workflow)
        clients, info = connect(urls, {n["class_type"] for n in workflow.values()})
        workflow = apply_sets(workflow, info, a.set)
        jobs = build_jobs(a, workflow, info)
        manifest = Manifest(a.manifest or os.path.join(a.out, "manifest.jsonl"))
        skip = {"done"} | (set() if a.retry_failed else {"failed"})
        todo = [j for j in jobs if (manifest.records.get(j.id) or {}).get("status") not in skip]
        known = {j.id for j in jobs} & set(manifest.records)
        wh = workflow_hash(workflow)
        other = sum(1 for j in known if manifest.records[j].get("workflow") not in (None, wh))
        if other:
            print(f"warning: {other} job(s) in {manifest.path} ran with a different workflow or --set; they are skipped "
                  f"all the same (use a new --manifest to run them again).", file=sys.stderr)
        print(f"{len(jobs)} job(s): {len(jobs) - len(todo)} already in {manifest.path}, {len(todo)} to run on "
              f"{len(clients)} server(s)", file=sys.stderr)
        if not todo:
            return 0
        manifest.open()
        progress = Progress(len(todo), quiet=a.quiet)
        runner = Runner(workflow, todo, clients, collector=download_outputs(a.out), manifest=manifest,
                        per_server=a.per_server, timeout=a.timeout, server_timeout=a.server_timeout,
                        max_attempts=a.max_attempts, use_ws=not a.no_websocket, progress=progress)
        s = runner.run()
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if manifest is not None:
            manifest.close()
    print(f"{s['jobs']} job(s) in {s['seconds']:.1f}s: {s['done']} done, {s['failed']} failed, {s['not_run']} not run; "
          f"manifest {manifest.path}", file=sys.stderr)
    if s["stopped"]:
        return 130
    if s["not_run"]:
        print("error: no server left (see above); rerun the same command to do the rest.", file=sys.stderr)
        return 2
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
