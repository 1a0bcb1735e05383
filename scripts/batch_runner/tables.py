"""Job tables: CSV (a header row of TITLE.INPUT columns) or JSONL (one object per line), each with an optional id."""
from __future__ import annotations

import csv
import io
import json
import os

from .common import BatchError
from .jobs import Job, derive_ids, make_job
from .workflow import check_value


def _no_constant(name):
    raise ValueError(f"{name} is not a number a job can use")


def parse_table(text: str, source: str, jsonl: bool) -> list[tuple[str, dict]]:
    """[(where, {column: value})] from a table's text; `source` names it in errors. Any text gives rows or a
    BatchError naming the line (tests/fuzz/fuzz_job_table.py holds it to that)."""
    rows = []
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:  # NaN / Infinity are refused here: JSON has no such numbers, Python's parser takes them
                row = json.loads(line, parse_constant=_no_constant)
            except (ValueError, RecursionError) as e:
                raise BatchError(f"--jobs {source} line {n} is not JSON ({str(e)[:200]}).") from None
            if not isinstance(row, dict):
                raise BatchError(f"--jobs {source} line {n}: each line must be a JSON object of "
                                 f'{{"TITLE.INPUT": value, ...}}, optionally with "id".')
            for key, value in row.items():
                if value is not None:
                    check_value(value, f"--jobs {source} line {n}, {key}")
            rows.append((f"{source} line {n}", row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if not reader.fieldnames:
                raise BatchError(f"--jobs {source} is empty: the first row names the inputs (TITLE.INPUT columns, "
                                 f"optionally 'id').")
            for row in reader:
                if None in row:
                    raise BatchError(f"--jobs {source} line {reader.line_num} has more cells than the header.")
                if any((v or "").strip() for v in row.values()):
                    rows.append((f"{source} line {reader.line_num}", {k.strip(): v for k, v in row.items()}))
        except csv.Error as e:
            raise BatchError(f"--jobs {source} line {reader.line_num} is not CSV ({e}).") from None
    if not rows:
        raise BatchError(f"--jobs {source} has no jobs.")
    return rows


def read_table(path: str) -> list[tuple[str, dict]]:
    """[(where, {column: value})] from a CSV (header row) or JSONL (one object per line) file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as e:
        raise BatchError(f"Cannot read --jobs {path}: {e.strerror}.") from None
    except ValueError as e:
        raise BatchError(f"--jobs {path} is not UTF-8 text ({e}).") from None
    return parse_table(text, path, path.lower().endswith((".jsonl", ".ndjson")))


def rows_jobs(workflow, info, rows: list[tuple[str, dict]], base: str) -> list[Job]:
    """Jobs from parsed rows; a path in an upload column is relative to `base` (the table's folder)."""
    jobs, seen, pending = [], {}, []
    for where, row in rows:
        row = dict(row)
        job_id = row.pop("id", None)
        if job_id not in (None, ""):
            job_id = str(check_value(job_id, f"{where}, id")).strip()
        pending.append((where, row, job_id or None))
    # ids derived over the whole table, so each reads as what tells it apart (the digest alone keeps it stable)
    derived = iter(derive_ids([{k: v for k, v in row.items() if v not in (None, "")}
                               for _, row, job_id in pending if job_id is None]))
    for where, row, job_id in pending:
        digest = None
        if job_id is None:
            job_id, digest = next(derived)
        job = make_job(workflow, info, row, len(jobs), where, base, job_id, digest)
        if job.id in seen:
            raise BatchError(f"{where} is the same job as {seen[job.id]} (id '{job.id}'): remove one, or give them "
                             f"different ids in an 'id' column.")
        seen[job.id] = where
        jobs.append(job)
    return jobs


def table_jobs(workflow, info, path: str) -> list[Job]:
    return rows_jobs(workflow, info, read_table(path), os.path.dirname(os.path.abspath(path)))
