"""Batch runner over ComfyUI's HTTP API: many jobs (references x prompts x seeds, or a CSV/JSONL table) through one
API-format workflow, spread over one or more ComfyUI servers the user already runs; resumable through a results
manifest. Standard library only, like comfy_server.py (the one HTTP + websocket client it uses): any Python 3.10+
runs it, ComfyUI's own included. The code lives in batch_runner/ (one module per concern); this file is the command
line and re-exports the names other scripts import (face_benchmark.py, tests, benchmarks).

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
OUT/<job id>/<name>_<k>.<ext>, <name> the saving node's filename_prefix or title) and the error; with no server
left, the jobs not run get a not_run line. Whatever a server answers, nothing is written outside OUT. A rerun with
the same manifest skips the jobs it lists (failed ones too, unless --retry-failed). Ctrl-C once: no new jobs, queued
ones are taken back, running ones finish and are recorded; twice: running ones are interrupted and left out. Exit
status: 0 all done, 1 some failed, 2 stopped (bad input, no server left), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import comfy_server  # noqa: E402,F401
from comfy_server import ComfyClient, ComfyServerError, write_atomic  # noqa: E402,F401

# the names scripts and tests have always imported from here
from batch_runner.common import (IMAGE_EXTS, BatchError, describe_error, is_network_error, now_iso,  # noqa: E402,F401
                                 one_line, refused)
from batch_runner.workflow import (UPLOAD_CLASSES, apply_sets, check_value, coerce, input_spec,  # noqa: E402,F401
                                   is_upload_input, load_api_workflow, resolve, workflow_hash)
from batch_runner.jobs import (Job, cross_jobs, derive_id, derive_ids, distinguishing_labels,  # noqa: E402,F401
                               job_dir_name, make_job, read_prompts, reference_images, slug)
from batch_runner.tables import parse_table, read_table, rows_jobs, table_jobs  # noqa: E402,F401
from batch_runner.manifest import Manifest  # noqa: E402,F401
from batch_runner.progress import Progress, clock  # noqa: E402,F401
from batch_runner.downloads import download_outputs, output_names  # noqa: E402,F401
from batch_runner.worker import Slot, Worker  # noqa: E402,F401
from batch_runner.runner import Runner  # noqa: E402,F401


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
        found = {j.id: manifest.find(j) for j in jobs}
        todo = [j for j in jobs if (found[j.id] or {}).get("status") not in skip]
        wh = workflow_hash(workflow)
        other = sum(1 for r in found.values() if r is not None and r.get("status") in skip
                    and r.get("workflow") not in (None, wh))
        if other:
            print(f"warning: {other} job(s) in {manifest.path} ran with a different workflow or --set; they are skipped "
                  f"all the same (use a new --manifest to run them again).", file=sys.stderr)
        print(f"{len(jobs)} job(s): {len(jobs) - len(todo)} already in {manifest.path}, {len(todo)} to run on "
              f"{len(clients)} server(s)", file=sys.stderr)
        if not todo:
            return 0
        manifest.open()
        progress = Progress(len(todo), quiet=a.quiet)
        runner = Runner(workflow, todo, clients, collector=download_outputs(a.out, workflow), manifest=manifest,
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
