"""Jobs: the node inputs one prompt sets, and an id that reads as what tells it apart from the others."""
from __future__ import annotations

import hashlib
import json
import os
import re

from .common import IMAGE_EXTS, BatchError
from .workflow import coerce, combo_choices, input_spec, is_upload_input, resolve

LABEL_CHARS = 40  # the readable part of one value in a job id


class Job:
    """One prompt to run: `inputs` [(node id, input name, value)], `values` {address: value} for the manifest.
    `digest`: the hash of the values that ends a derived id (None for an id the user gave)."""

    def __init__(self, job_id: str, index: int, values: dict, inputs: list, uploads: set | None = None, data=None,
                 digest: str | None = None):
        self.id, self.index, self.values, self.inputs = job_id, index, values, inputs
        self.uploads = uploads or set()  # positions in `inputs` that are a local file to upload
        self.data = data  # whatever the caller attaches (face_benchmark: reference, prompt, seed)
        self.digest = digest
        self.attempts = 0  # servers that died while running it

    def __repr__(self):
        return f"Job({self.id!r})"


# ---- ids

def slug(text: str, n: int = 20) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n].strip("_")


def values_digest(values: dict) -> str:
    """The same values, the same digest: a rerun finds its jobs in the manifest (unchanged since the first manifests)."""
    return hashlib.sha1(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:8]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def _cut(words: list[str], n: int = LABEL_CHARS) -> str:
    out = ""
    for w in words:
        if out and len(out) + 1 + len(w) > n:
            break
        out = f"{out}_{w}" if out else w[:n]
    return out


def distinguishing_labels(texts) -> dict[str, str]:
    """{text: its words that the other texts lack}: 'a photo of a person, smiling, facing left' and '..., crying,
    facing front' read 'smiling_left' and 'crying_front', not the common prefix. Words every text has are dropped;
    when that leaves nothing (the same words in another order), the common leading and trailing words are."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < 2:
        return {t: _cut(_words(t), 20) for t in distinct}
    words = {t: _words(t) for t in distinct}
    common = set.intersection(*({w.lower() for w in ws} for ws in words.values()))
    labels = {t: [w for w in ws if w.lower() not in common] for t, ws in words.items()}
    if not all(labels.values()):
        lower = [[w.lower() for w in ws] for ws in words.values()]
        head = len(os.path.commonprefix(lower))
        tail = len(os.path.commonprefix([l[::-1] for l in lower]))
        labels = {t: ws[head:len(ws) - tail if len(ws) - tail > head else len(ws)] or ws for t, ws in words.items()}
    return {t: _cut(ws) for t, ws in labels.items()}


def _readable(value) -> str:
    if isinstance(value, str) and value.lower().endswith(IMAGE_EXTS):
        return os.path.splitext(os.path.basename(value))[0]  # a reference: its file name
    return str(value)


def derive_ids(rows: list[dict]) -> list[tuple[str, str]]:
    """[(id, digest)] for each job's values: up to four readable parts (per address, the words that tell the jobs
    apart) and the digest, stable across reruns of the same values."""
    labels = {}
    for address in dict.fromkeys(a for r in rows for a in r):
        texts = [_readable(r[address]) for r in rows if address in r]
        if any(" " in t.strip() for t in texts):  # prompts: their distinguishing words
            labels[address] = distinguishing_labels(texts)
        else:
            labels[address] = {t: slug(t, LABEL_CHARS) for t in texts}
    out = []
    for r in rows:
        digest = values_digest(r)
        parts = [labels[a][_readable(v)] for a, v in r.items()]
        out.append(("-".join([p for p in parts if p][:4] + [digest]), digest))
    return out


def derive_id(values: dict) -> str:
    """The id of one job on its own (no others to tell it apart from)."""
    return derive_ids([values])[0][0]


def job_dir_name(job_id: str) -> str:
    """The job's output folder: its id when that is a safe file name, else a safe form plus a hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job_id).lstrip(".")[:80] or "job"
    return safe if safe == job_id else f"{safe}-{hashlib.sha1(job_id.encode()).hexdigest()[:8]}"


# ---- jobs

def _upload_value(v: str, spec, base_dir: str, where: str):
    """(value, is a local file): a local file (relative to base_dir) is uploaded; else it must be a file the server
    already has, which /object_info lists for LoadImage. A path that is neither is an error before anything runs."""
    local = v if os.path.isabs(v) else os.path.join(base_dir, v)
    if os.path.isfile(local):
        return os.path.abspath(local), True
    choices = combo_choices(spec)
    known = v in choices if choices is not None else not (os.path.isabs(v) or "/" in v or os.sep in v)
    if not known:
        server = f", and the server's input folder has no {v!r}" if choices is not None else ""
        raise BatchError(f"{where}: no file {os.path.abspath(local)} (a path is relative to the table's folder)"
                         f"{server}. Fix the path, or put the file there.")
    return v, False


def make_job(workflow, info, values: dict, index: int, where: str, base_dir: str = "", job_id: str | None = None,
             digest: str | None = None) -> Job:
    inputs, uploads, clean = [], set(), {}
    for address, value in values.items():
        if value is None or (isinstance(value, str) and value == ""):
            continue  # an empty cell keeps the workflow's value
        for nid, name in resolve(workflow, info, address, where):
            node = workflow[nid]
            spec = input_spec(info, node["class_type"], name)
            v = coerce(value, spec, f"{where}, {address}")
            if is_upload_input(info, node["class_type"], name) and isinstance(v, str):
                v, local = _upload_value(v, spec, base_dir, f"{where}, {address}")
                if local:
                    uploads.add(len(inputs))
            inputs.append((nid, name, v))
        clean[address] = value
    if job_id is None:
        job_id, digest = derive_ids([clean])[0]
    return Job(job_id, index, clean, inputs, uploads, digest=digest)


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
    except ValueError as e:
        raise BatchError(f"--prompts {path} is not UTF-8 text ({e}).") from None
    prompts = list(dict.fromkeys(lines))  # a repeated prompt would only repeat its jobs
    if not prompts:
        raise BatchError(f"--prompts {path} has no prompts: one per line (blank lines and # comments are ignored).")
    return prompts


def cross_jobs(workflow, info, refs, prompts, seeds, ref_input, prompt_input, seed_input) -> list[Job]:
    """reference x prompt x seed, each dimension optional (None: the workflow's value)."""
    combos = []
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
                combos.append(values)
    # the id from the reference's file name, not its path: the same folder given another way is the same job
    keys = [{**v, **({ref_input: os.path.basename(v[ref_input])} if ref_input in v else {})} for v in combos]
    return [make_job(workflow, info, values, k, "job", job_id=job_id, digest=digest)
            for k, (values, (job_id, digest)) in enumerate(zip(combos, derive_ids(keys)))]
