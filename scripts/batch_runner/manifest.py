"""The results file (JSONL): one whole line per finished job, appended with one write and fsync; resumable."""
from __future__ import annotations

import json
import math
import os
import re
import sys

from .common import BatchError


def json_safe(value):
    """The value as strict JSON can hold it: a NaN or infinity as its text, anything else unknown by its repr. A job
    is recorded whatever its values or the server's answer hold, instead of the manifest write failing."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class Manifest:
    """The results file: one JSON object per line, each appended with a single write and fsync, so a crash or
    Ctrl-C leaves whole lines (a torn last line, e.g. after a power cut, is ignored on reading). The last line of a job
    wins. Locked while a runner writes it, so two runs cannot interleave on one manifest."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self._fd = None
        self._need_newline = False
        self._digests = None
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
                except (ValueError, KeyError, TypeError, RecursionError):
                    print(f"warning: {path} line {n} is not a whole record (an interrupted write?); ignored, its job "
                          f"runs again.", file=sys.stderr)

    def find(self, job):
        """The job's last record: by its id, or for a derived id by the digest of its values (the readable part of an
        id depends on the other jobs of the batch: one prompt more must not run the others again)."""
        rec = self.records.get(job.id)
        if rec is None and getattr(job, "digest", None):
            if self._digests is None:
                self._digests = {m.group(1): r for job_id, r in self.records.items()
                                 if (m := re.search(r"-([0-9a-f]{8})$", job_id))}
            rec = self._digests.get(job.digest)
        return rec

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
        try:
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError):
            record = json_safe(record)
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        # a lone surrogate (a JSON \ud800 escape in a table) as that escape: still one valid JSON line
        data = (("\n" if self._need_newline else "") + text + "\n").encode("utf-8", "backslashreplace")
        written = os.write(self._fd, data)  # O_APPEND: one write, one whole line
        while written < len(data):  # only on a full disk or a signal mid-write; finish the line
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self._need_newline = False
        self.records[record["job"]] = record
        self._digests = None

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
