"""Throughput of scripts/batch.py on 3 ComfyUI servers against 1, measured in one run (issue 12).

    .hosts/0.3.75/venv/bin/python benchmarks/bench_batch.py [--jobs 24] [--repeats 2] [--workflow cheap|synthetic]

Starts three ComfyUI servers (main.py --cpu, this pack linked, one base directory each), warms each up with one job,
then alternates, --repeats times: the batch on server 1 alone, the same number of new jobs on all three. Every job is
new to its server (its own seed, or blur sigma), so ComfyUI's cache never skips the work. Figures: seconds per phase,
jobs per minute, and the ratio (jobs/min on 3) / (jobs/min on 1), the median over repeats. Results also go to
benchmarks/results/bench_batch.json.

Workflows: `cheap` (core nodes: LoadImage -> ImageScale 1024 -> ImageBlur -> SaveImage, ~0.5 s of CPU a job) or
`synthetic` (the shipped synthetic faces model, workflows/api/idfusion_synthetic_demo_api.json, when models/ has it).
On a machine with one server per GPU the ratio approaches the number of servers; on a CPU-only box the servers
share the cores, so it stays well below that (see the README's batch section).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import batch  # noqa: E402
import comfy_server  # noqa: E402

CHEAP = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "none.png"}, "_meta": {"title": "reference"}},
    "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 1024,
                                                  "height": 1024, "crop": "disabled"}, "_meta": {"title": "scale"}},
    "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 15, "sigma": 1.0},
          "_meta": {"title": "blur"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bench"}, "_meta": {"title": "save"}},
}
SYNTHETIC = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_demo_api.json")
REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")


def seed_address(workflow: dict) -> str:
    for nid, node in workflow.items():
        for name in ("seed", "noise_seed"):
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                return f"{nid}.{name}"
    raise SystemExit("the workflow has no seed input to vary")


def make_jobs(kind, workflow, info, n, start):
    if kind == "cheap":
        return [batch.make_job(workflow, info, {"reference.image": REFERENCE, "blur.sigma": 1.0 + 0.01 * ((start + k) % 900)},
                               k, "bench", job_id=f"j{start + k}") for k in range(n)]
    address = seed_address(workflow)
    return [batch.make_job(workflow, info, {address: 1000 + start + k}, k, "bench", job_id=f"j{start + k}")
            for k in range(n)]


def timed_batch(workflow, jobs, clients, out):
    errors = []
    runner = batch.Runner(workflow, jobs, clients, collector=batch.download_outputs(out, workflow),
                          on_record=lambda job, rec: rec["error"] and errors.append(rec["error"]),
                          progress=batch.Progress(len(jobs), quiet=True))
    t = time.perf_counter()
    s = runner.run()
    seconds = time.perf_counter() - t
    if s["done"] != len(jobs):
        raise SystemExit(f"batch incomplete: {s}\n" + "\n".join(errors[:3]))
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=24, help="jobs per phase (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="1-server / 3-server pairs (default: %(default)s)")
    p.add_argument("--workflow", choices=("cheap", "synthetic"), default="cheap")
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_batch.json"))
    a = p.parse_args(argv)
    if a.workflow == "synthetic":
        if not os.path.isfile(SYNTHETIC):
            raise SystemExit(f"{SYNTHETIC} is missing: use --workflow cheap")
        workflow = comfy_server.load_workflow(SYNTHETIC)
    else:
        workflow = CHEAP
    tmp = tempfile.mkdtemp(prefix="bench_batch_")
    servers = [comfy_server.ComfyServer(None, os.path.join(tmp, f"base{i}")) for i in range(a.servers)]
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready(300)
        info = servers[0].check_nodes({n["class_type"] for n in workflow.values()})
        counter = 0
        for k, s in enumerate(servers):  # warm-up: first-run imports and model loading are not throughput
            timed_batch(workflow, make_jobs(a.workflow, workflow, info, 1, 100000 + k), [s], os.path.join(tmp, "out"))
        one, many = [], []
        for r in range(a.repeats):
            for phase, clients in (("1", servers[:1]), ("n", servers)):
                jobs = make_jobs(a.workflow, workflow, info, a.jobs, counter)
                counter += a.jobs
                sec = timed_batch(workflow, jobs, clients, os.path.join(tmp, "out"))
                (one if phase == "1" else many).append(sec)
                print(f"repeat {r + 1}: {a.jobs} jobs on {len(clients)} server(s): {sec:.1f}s "
                      f"({60 * a.jobs / sec:.1f} jobs/min)", flush=True)
        ratios = [t1 / tn for t1, tn in zip(one, many)]
        result = {"workflow": a.workflow, "jobs": a.jobs, "servers": a.servers, "seconds_1": one, "seconds_n": many,
                  "ratio_median": statistics.median(ratios), "ratios": ratios, "cpus": os.cpu_count(),
                  "per_server": 2, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"throughput {a.servers} servers vs 1: {result['ratio_median']:.2f}x "
              f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)}; {os.cpu_count()} CPU cores)")
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        comfy_server.write_atomic(a.json, json.dumps(result, indent=2) + "\n")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
