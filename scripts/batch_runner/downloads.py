"""Output files into OUT/<job>/, named by the node that saved them; only under OUT, whatever the server answers."""
from __future__ import annotations

import collections
import hashlib
import os
import re

from comfy_server import ComfyClient, ComfyServerError, write_atomic

from .jobs import Job, job_dir_name


def safe_part(text, n: int = 60) -> str:
    """A file name part from anything a workflow or a server says: letters, digits, '-', '_' only (no separator, no
    dot-dot, no drive), never empty."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_")[:n].strip("_")


def output_names(workflow: dict | None, job: Job, node_ids) -> dict[str, str]:
    """{node id: the name its files get}: the SaveImage node's filename_prefix (its last part: 'idfusion_demo/
    with_identity' -> 'with_identity', as this job set it), else its title, else 'node_<id>'. Names two nodes would
    share get the node id (or its hash)."""
    workflow = workflow or {}
    sent = {(nid, name): v for nid, name, v in job.inputs}
    names = {}
    for nid in node_ids:
        node = workflow.get(nid) if isinstance(workflow.get(nid), dict) else {}
        prefix = sent.get((nid, "filename_prefix"), (node.get("inputs") or {}).get("filename_prefix"))
        title = (node.get("_meta") or {}).get("title")
        name = ""
        if isinstance(prefix, str) and prefix.strip() not in ("", "ComfyUI"):  # ComfyUI: SaveImage's default
            name = safe_part(re.split(r"[\\/]", prefix.strip())[-1])
        if not name and isinstance(title, str):
            name = safe_part(title)
        names[nid] = name or f"node_{safe_part(nid, 20) or 'x'}"
    for tag in (lambda nid: safe_part(nid, 20) or "x", lambda nid: hashlib.sha1(nid.encode()).hexdigest()[:8]):
        counts = collections.Counter(names.values())  # shared names get the node id, then (ids made safe alike) its hash
        names = {nid: (n if counts[n] == 1 else f"{n}_{tag(nid)}") for nid, n in names.items()}
    return names


def _checked_files(client: ComfyClient, entry) -> list[tuple[str, dict]]:
    """The entry's output files, each {filename, subfolder, type} of strings; a server's answer of another shape fails
    the job with what was wrong, instead of an exception inside the runner."""
    outputs = entry.get("outputs") if isinstance(entry, dict) else None
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        raise ComfyServerError(f"{client.url} answered /history with outputs that are not a node -> files object.")
    files = client.output_files(entry)
    for _, f in files:
        bad = [k for k in ("filename", "subfolder", "type") if f.get(k) is not None and not isinstance(f.get(k), str)]
        if bad or not f["filename"]:
            raise ComfyServerError(f"{client.url} listed an output file with a bad {', '.join(bad) or 'filename'}: "
                                   f"{str(f)[:200]}.")
    return files


def inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def download_outputs(out_dir: str, workflow: dict | None = None):
    """The default collector: every output file of the prompt (SaveImage & co., type 'output') through GET /view into
    OUT/<job>/<name>_<k><ext>, <name> from output_names (names that do not depend on the server's counter, so a rerun
    overwrites). Nothing the server answers reaches the path unsanitised, and the path is checked to stay in OUT."""
    def collect(job: Job, client: ComfyClient, entry: dict) -> dict:
        listed = _checked_files(client, entry)
        names = output_names(workflow, job, dict.fromkeys(nid for nid, _ in listed))
        files, count = [], collections.Counter()
        folder = os.path.join(out_dir, job_dir_name(job.id))
        for node_id, f in listed:
            ext = os.path.splitext(f["filename"])[1].lower()
            ext = ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ".bin"
            name = f"{names[node_id]}_{count[names[node_id]]}{ext}"
            count[names[node_id]] += 1
            if not inside(out_dir, os.path.join(folder, name)):  # a link planted in OUT, say: refuse, never follow
                raise ComfyServerError(f"{os.path.join(folder, name)} is not inside --out {out_dir}; not written.")
            write_atomic(os.path.join(folder, name), client.view(f))
            files.append({"file": os.path.join(job_dir_name(job.id), name), "node": node_id,
                          "server_file": "/".join(p for p in (f.get("type") or "output", f.get("subfolder"),
                                                                f["filename"]) if p)})
        return {"outputs": files}
    return collect
