"""Face benchmark over ComfyUI's HTTP API (the paper's protocol, section 4.2): every reference photo in a folder x
every prompt x every seed x every setting of a grid goes through an API-format workflow, is scored by the workflow's
IDFusion Face Evaluate node, and ends up in <out>/face_benchmark.csv (one row per generated image),
<out>/face_benchmark.md (mean scores per prompt, per setting and overall) and, with ground truths,
<out>/face_benchmark_chart.png: fidelity against copy-paste, Sim(GT) over M_CP, one point per setting (per run
without a grid). A setting high on the chart and left of 0 keeps the identity without copying the reference.

Scores (the node's, see idfusion/metrics.py for the definitions and their sources): Sim(Ref) = ArcFace cosine
similarity to the reference (distance = 1 - cos); SSIM and PSNR on aligned face crops; with --ground-truth (another
photo of each person) Sim(GT) and MultiID-Bench's copy-paste M_CP (+1 = a copy of the reference, -1 = like the ground
truth); for pictures with several faces, leakage (MultiID-Bench) and ID-Conf (UMO).

    python scripts/face_benchmark.py --faces faces/ --prompts prompts.txt --out results/ \\
        [--workflow workflows/api/idfusion_face_benchmark_api.json] [--url http://127.0.0.1:8188] [--seeds 1 --seed 0] \\
        [--ground-truth gt/] [--grid "IDFusion Apply.weight=0.6,0.8,1.0" --grid "IDFusion Apply.end_at=0.6,1.0"]
    python scripts/face_benchmark.py ... --base DIR [--comfyui DIR] [--python PY]   # start a server of its own

The workflow (exported with "Save (API)") marks the nodes to fill by their titles, exact and case-insensitive:
    reference   the LoadImage that gets each uploaded reference photo (exactly one)
    prompt      the node whose `text` gets each prompt, e.g. the positive CLIPTextEncode (exactly one)
    seed        the node(s) whose `seed` or `noise_seed` gets each seed, e.g. the KSampler (one or more)
The scores come from its one IDFusionFaceEvaluate node (its `idfusion_scores` ui entry, one per image); the images
it scored are fetched from the SaveImage fed by the same IMAGE into <out>/images/.

Inputs: --faces holds the reference photos (.png .jpg .jpeg .webp .bmp), each uploaded with POST /upload/image;
the prompts file has one prompt per line (blank lines, lines starting with # and repeats are ignored); --seeds N
--seed S runs seeds S .. S+N-1. --ground-truth DIR holds, for every reference, another photo of that person with the
same file name stem (faces/anna.png <-> gt/anna.jpg); it goes to the LoadImage feeding Face Evaluate's ground_truth
(added to the workflow when there is none). --grid TITLE.INPUT=V1,V2,... (repeatable; the batch runner's addresses:
a node title, id or class type, a dot, a widget input) runs every combination of the values. A run that fails
(rejected or failing prompt) is a row with its error and the benchmark goes on. The files are rewritten atomically
after every run. Exit status: 0 all runs scored, 1 some run failed, 2 stopped (bad input, server unreachable or
gone), 130 Ctrl-C. Standard library only, like comfy_server.py; the chart needs Pillow (every ComfyUI has it: run
with ComfyUI's Python) and is skipped with a warning without it.

The runs go through scripts/batch.py's runner (the same client, queueing and distribution): pass --url several times
to spread them over several servers; a server that dies hands its runs to the others.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import math
import os
import sys
import urllib.error

import batch
import comfy_server
from comfy_server import ComfyClient, ComfyServer, ComfyServerError, write_atomic  # noqa: F401 (write_atomic: API)

DEFAULT_WORKFLOW = os.path.join(comfy_server.ROOT, "workflows", "api", "idfusion_face_benchmark_api.json")
SCORER = "IDFusionFaceEvaluate"
# marker title -> the inputs it may set (first one present wins), and how to add the marker
MARKERS = {
    "reference": (("image",), "Title the LoadImage of the reference photo 'reference'."),
    "prompt": (("text",), "Title the positive prompt's CLIPTextEncode 'prompt'."),
    "seed": (("seed", "noise_seed"), "Title the KSampler (or another node with a seed input) 'seed'."),
}
SCORES = ("similarity", "distance", "ssim", "psnr")
IDENTITY = ("sim_gt", "copy_paste", "leakage", "id_conf")  # defined only sometimes: empty cells where not
COLUMNS = ("reference", "prompt", "seed", "face_found", *SCORES, *IDENTITY, "faces", "image", "error")
CSV_NAME, MD_NAME, CHART_NAME = "face_benchmark.csv", "face_benchmark.md", "face_benchmark_chart.png"
GT_TITLE = "ground truth"
BASELINE = 0.46  # median similarity of two real photos of one person (WithAnyone, arXiv 2510.14975, Fig. 2)
DEFAULT_URL = "http://127.0.0.1:8188"


class BenchmarkError(Exception):
    """Something the user can fix before any run: printed as one message, no traceback."""


# ---------------------------------------------------------------------------------------------- inputs

def reference_images(folder: str) -> list[str]:
    try:
        return batch.reference_images(folder, "--faces", "reference images")
    except batch.BatchError as e:
        raise BenchmarkError(f"{e} Put one photo per reference in it.") from None


def read_prompts(path: str) -> list[str]:
    try:
        return batch.read_prompts(path)
    except batch.BatchError as e:
        raise BenchmarkError(str(e)) from None


def ground_truths(folder: str | None, refs: list[str]) -> dict:
    """{reference path: its ground-truth photo}: the file in `folder` with the reference's name stem."""
    if folder is None:
        return {}
    try:
        files = batch.reference_images(folder, "--ground-truth", "ground-truth photos")
    except batch.BatchError as e:
        raise BenchmarkError(f"{e} Put another photo of each reference person in it, named like the reference.") from None
    by_stem = {}
    for f in files:
        by_stem.setdefault(os.path.splitext(os.path.basename(f))[0], f)
    out, missing = {}, []
    for ref in refs:
        stem = os.path.splitext(os.path.basename(ref))[0]
        if stem in by_stem:
            out[ref] = by_stem[stem]
        else:
            missing.append(os.path.basename(ref))
    if missing:
        raise BenchmarkError(f"--ground-truth {folder} has no photo named like reference(s) {', '.join(missing)} (the same "
                             f"name with any image extension, e.g. {os.path.splitext(missing[0])[0]}.jpg). Add one per "
                             f"reference: another photo of that person, not the reference itself.")
    return out


def typed(text: str, current, where: str):
    """A --grid value as the type of the input's current value in the workflow (INT, FLOAT, BOOLEAN or text)."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise BenchmarkError(f"{where}: '{text}' is not a {type(current).__name__} like the input's value "
                             f"{current!r}.") from None
    return text


def parse_grid(items, workflow: dict) -> list[tuple[str, list, list]]:
    """[(address, [(node id, input)], [values])] from --grid TITLE.INPUT=V1,V2,..."""
    grid = []
    for item in items or []:
        address, eq, values = item.partition("=")
        where = f"--grid {item}"
        if not eq or not values.strip():
            raise BenchmarkError(f"{where}: write TITLE.INPUT=V1,V2,..., e.g. --grid 'IDFusion Apply.weight=0.6,0.8,1.0'.")
        try:
            targets = batch.resolve(workflow, None, address, where)
        except batch.BatchError as e:
            raise BenchmarkError(str(e)) from None
        nid, name = targets[0]
        current = workflow[nid]["inputs"].get(name)
        if isinstance(current, list):
            raise BenchmarkError(f"{where}: input '{name}' of node {nid} is connected to another node; a grid sets "
                                 f"widget values only.")
        grid.append((address.strip(), targets, [typed(v.strip(), current, where) for v in values.split(",")]))
    if len({a for a, _, _ in grid}) < len(grid):
        raise BenchmarkError("--grid names one input twice: put all its values in one --grid.")
    return grid


def settings_of(grid) -> list[dict]:
    """Every combination of the grid's values, {address: value}; one empty setting without a grid."""
    return [dict(zip([a for a, _, _ in grid], combo)) for combo in itertools.product(*[v for _, _, v in grid])]


def setting_label(setting: dict) -> str:
    return ", ".join(f"{a.rpartition('.')[2]}={v}" for a, v in setting.items())


def ground_truth_input(workflow: dict, scorer: str) -> tuple[dict, str]:
    """(workflow, LoadImage node id) for the ground truth: the LoadImage already feeding the scorer's ground_truth,
    else one titled 'ground truth' (then linked), else a new one."""
    wf = copy.deepcopy(workflow)
    link = wf[scorer]["inputs"].get("ground_truth")
    if isinstance(link, list) and wf.get(str(link[0]), {}).get("class_type") == "LoadImage":
        return wf, str(link[0])
    titled = [nid for nid, n in wf.items() if str((n.get("_meta") or {}).get("title", "")).strip().lower() == GT_TITLE
              and n["class_type"] == "LoadImage"]
    nid = titled[0] if titled else str(max([int(k) for k in wf if k.isdigit()] + [0]) + 1)
    if not titled:
        wf[nid] = {"class_type": "LoadImage", "inputs": {"image": ""}, "_meta": {"title": GT_TITLE}}
    wf[scorer]["inputs"]["ground_truth"] = [nid, 0]
    return wf, nid


def load_workflow(path: str) -> dict:
    try:
        return comfy_server.load_workflow(path)
    except OSError as e:
        raise BenchmarkError(f"Cannot read --workflow {path}: {e.strerror}.") from None
    except ValueError as e:  # not JSON at all
        raise BenchmarkError(f"--workflow {path} is not JSON ({e}); export the workflow with 'Save (API)'.") from None
    except ComfyServerError as e:
        raise BenchmarkError(str(e)) from None


def marked_inputs(workflow: dict, path: str) -> dict:
    """{marker: [(node id, input name), ...]} from the nodes' titles; raises naming a missing or doubled marker."""
    found = {m: [] for m in MARKERS}
    for nid, node in workflow.items():
        title = str((node.get("_meta") or {}).get("title", "")).strip().lower()
        if title not in MARKERS:
            continue
        names = MARKERS[title][0]
        name = next((n for n in names if n in node.get("inputs", {})), None)
        if name is None:
            raise BenchmarkError(f"{path}: node {nid} ({node['class_type']}) is titled '{title}' but has no "
                                 f"{' or '.join(names)} input to set. {MARKERS[title][1]}")
        found[title].append((nid, name))
    for marker, nodes in found.items():
        if not nodes:
            raise BenchmarkError(f"{path}: no node is titled '{marker}', so the benchmark cannot fill it in. "
                                 f"{MARKERS[marker][1]} (In ComfyUI: right-click the node > Title, then export with "
                                 f"'Save (API)'.)")
        if len(nodes) > 1 and marker != "seed":
            raise BenchmarkError(f"{path}: nodes {', '.join(n for n, _ in nodes)} are all titled '{marker}'; "
                                 f"title exactly one.")
    return found


def scorer_and_saver(workflow: dict, path: str) -> tuple[str, str | None]:
    """The IDFusionFaceEvaluate node, and the node saving the images it scores (same IMAGE link), if any."""
    scorers = [nid for nid, n in workflow.items() if n["class_type"] == SCORER]
    if len(scorers) != 1:
        raise BenchmarkError(f"{path}: needs exactly one {SCORER} node (IDFusion Face Evaluate, fed by the generated "
                             f"image and the reference LoadImage) to score the runs; it has {len(scorers)}.")
    link = workflow[scorers[0]]["inputs"].get("image")
    savers = [nid for nid, n in workflow.items() if nid != scorers[0] and n["inputs"].get("images") == link]
    return scorers[0], (savers[0] if savers else None)


# ---------------------------------------------------------------------------------------------- runs

def fill(workflow: dict, marks: dict, values: dict) -> dict:
    wf = copy.deepcopy(workflow)
    for marker, value in values.items():
        for nid, name in marks[marker]:
            wf[nid]["inputs"][name] = value
    return wf


one_line = batch.one_line  # the error for a CSV cell: without the server's traceback, on one line


def run_one(client, workflow, scorer, saver, image_stem, out_dir, timeout):
    """Queue one filled workflow and wait; returns [(scores, image path relative to out_dir or "")] per scored image."""
    return scored_images(client, client.wait(client.queue(workflow), timeout=timeout), scorer, saver, image_stem, out_dir)


def scored_images(client, entry, scorer, saver, image_stem, out_dir):
    """[(scores, image path relative to out_dir or "")] from a finished run's history entry; the images are fetched
    through GET /view."""
    outputs = entry.get("outputs") or {}
    scores = (outputs.get(scorer) or {}).get("idfusion_scores")
    if not scores:
        raise ComfyServerError(f"The {SCORER} node {scorer} reported no scores: it did not run (a blocked input), or the "
                               f"server's ComfyUI-IDFusion predates its idfusion_scores output (update it).")
    images = ((outputs.get(saver) or {}).get("images") or []) if saver else []
    rows = []
    for k, s in enumerate(scores):
        rel = ""
        if k < len(images):
            ext = os.path.splitext(images[k]["filename"])[1] or ".png"
            rel = os.path.join("images", f"{image_stem}_{k}{ext}")
            write_atomic(os.path.join(out_dir, rel), client.view(images[k]))
        rows.append((s, rel))
    return rows


def score_row(reference, prompt, seed, scores=None, image="", error="", setting=None):
    row = {"reference": reference, "prompt": prompt, "seed": seed, **(setting or {}), "image": image, "error": error,
           "face_found": "" if scores is None else bool(scores["found"])}
    for k in SCORES:
        row[k] = "" if scores is None else float(scores[k])  # float("inf") / nan for the "inf" / "nan" the node sends
    for k in IDENTITY:  # null from the node (no ground truth, one face) is an empty cell
        row[k] = "" if scores is None or scores.get(k) is None else float(scores[k])
    row["faces"] = "" if scores is None else json.dumps(scores.get("faces", []), separators=(",", ":"))
    return row


def columns(grid=()) -> tuple:
    return ("reference", "prompt", "seed", *[a for a, _, _ in grid], *COLUMNS[3:])


# ---------------------------------------------------------------------------------------------- outputs

def csv_text(rows: list[dict], grid=()) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns(grid), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)  # floats as repr: every digit, and "inf"
    return buf.getvalue()


def summarize(rows: list[dict]) -> dict:
    """n scored images, failed runs, face-found rate and mean scores (an image without a face scores as a miss:
    similarity 0, distance 1, SSIM 0, PSNR 0, as the node reports it). Sim(GT), M_CP, leakage and ID-Conf are means
    over the images where they are defined (nan: nowhere)."""
    scored = [r for r in rows if not r["error"]]
    out = {"n": len(scored), "failed": len(rows) - len(scored)}
    out["found"] = sum(r["face_found"] for r in scored) / len(scored) if scored else math.nan
    for k in SCORES:
        out[k] = sum(r[k] for r in scored) / len(scored) if scored else math.nan
    for k in IDENTITY:
        vals = [r[k] for r in scored if r[k] != ""]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def markdown(rows, prompts, n_refs, n_seeds, workflow_path, grid=(), chart=False) -> str:
    def cells(label, s):
        num = lambda v, spec: "-" if math.isnan(v) else format(v, spec)  # nan: no image was scored / not defined
        return (f"| {label} | {s['n']} | {s['failed']} | {num(s['found'], '.0%')} | {num(s['similarity'], '.4f')} "
                f"| {num(s['distance'], '.4f')} | {num(s['ssim'], '.4f')} | {num(s['psnr'], '.2f')} "
                f"| {num(s['sim_gt'], '.4f')} | {num(s['copy_paste'], '+.4f')} | {num(s['leakage'], '.4f')} "
                f"| {num(s['id_conf'], '.4f')} |")
    settings = settings_of(grid)
    runs = n_refs * len(prompts) * n_seeds * len(settings)
    keys = ("reference", "prompt", "seed", *[a for a, _, _ in grid])
    done = len({tuple(r[k] for k in keys) for r in rows})  # the file is rewritten after every run
    total = summarize(rows)
    size = f"{n_refs} reference(s) x {len(prompts)} prompt(s) x {n_seeds} seed(s)"
    if grid:
        size += f" x {len(settings)} setting(s)"
    header = ("| {} | n | failed runs | face found | similarity | distance | SSIM | PSNR | Sim(GT) | M_CP | leakage "
              "| ID-Conf |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = ["# Face benchmark", "",
             f"Workflow `{os.path.basename(workflow_path)}`: {size} = {runs} run(s); {done} done, {total['failed']} "
             "failed. Identity: Sim(Ref), the ArcFace cosine similarity to the reference (distance = 1 - cos); face "
             "quality: SSIM and PSNR (dB) on aligned face crops (paper section 4.2). Means over the n generated images; "
             "an image without a face counts as similarity 0, distance 1, SSIM 0, PSNR 0. With ground truths: Sim(GT) and "
             "copy-paste M_CP (MultiID-Bench: +1 = a copy of the reference, -1 = like the ground truth); with several "
             "faces: leakage (MultiID-Bench, mean similarity of the unmatched face/reference pairs) and ID-Conf (UMO); "
             "these are means over the images where they are defined (- where none). Two photos of one person score a "
             "median similarity of about 0.46 (WithAnyone, arXiv 2510.14975), so far above that is copying. Per image: "
             "`face_benchmark.csv`.", ""]
    if chart:
        lines += [f"![fidelity against copy-paste: Sim(GT) over M_CP]({CHART_NAME})", ""]
    lines += [header.format("prompt"), rule]
    for p in prompts:
        lines.append(cells(p.replace("|", "\\|"), summarize([r for r in rows if r["prompt"] == p])))
    lines.append(cells("**all**", total))
    if grid:
        lines += ["", header.format("setting"), rule]
        for st in settings:
            lines.append(cells(setting_label(st).replace("|", "\\|"),
                               summarize([r for r in rows if all(r.get(a) == v for a, v in st.items())])))
    return "\n".join(lines) + "\n"


def chart_points(rows, grid) -> list[tuple[str, float, float]]:
    """[(label, mean M_CP, mean Sim(GT))]: one per setting with a grid, one per run without; only where defined."""
    groups = {}
    for r in rows:
        if r["error"] or r["copy_paste"] == "" or r["sim_gt"] == "":
            continue
        key = setting_label({a: r[a] for a, _, _ in grid}) if grid else f"{r['reference']} | {r['prompt']} | seed {r['seed']}"
        groups.setdefault(key, []).append(r)
    return [(k, sum(r["copy_paste"] for r in g) / len(g), sum(r["sim_gt"] for r in g) / len(g)) for k, g in groups.items()]


def chart_png(points) -> bytes | None:
    """The fidelity-against-copy-paste chart of `points` [(label, M_CP, Sim(GT))] as PNG bytes, None without Pillow.
    Drawn by the pack's idfusion/chart.py (loaded by path: the pack's folder must not shadow ComfyUI's modules)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("idfusion_chart", os.path.join(comfy_server.ROOT, "idfusion", "chart.py"))
    chart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart)
    image = chart.fidelity_chart(points, BASELINE)
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- main

def connect(a) -> list[ComfyClient]:
    if a.base:
        server = ComfyServer(a.comfyui, a.base, python=a.python)
        print(f"starting ComfyUI in {server.base_dir} (log: {server.log_path})", flush=True)
        return [server.start(a.start_timeout)]
    clients, unreachable = [], []
    for url in a.url or [DEFAULT_URL]:
        client = ComfyClient(url)
        try:
            client.get_json("/system_stats", timeout=15)
        except (urllib.error.URLError, OSError, ValueError) as e:
            unreachable.append(f"Cannot reach ComfyUI at {url} ({getattr(e, 'reason', e)}).")
            continue
        clients.append(client)
    if not clients:
        raise BenchmarkError(" ".join(unreachable) + " Start it (python main.py --listen) and pass its address with "
                             "--url, or use --base DIR to let this script start one.")
    for line in unreachable:
        print(f"warning: {line} Running on the other server(s).", file=sys.stderr)
    return clients


def benchmark(a) -> int:
    refs = reference_images(a.faces)
    prompts = read_prompts(a.prompts)
    workflow = load_workflow(a.workflow)
    marks = marked_inputs(workflow, a.workflow)
    scorer, saver = scorer_and_saver(workflow, a.workflow)
    gts = ground_truths(a.ground_truth, refs)
    gt_node = None
    if gts:
        workflow, gt_node = ground_truth_input(workflow, scorer)
    grid = parse_grid(a.grid, workflow)
    settings = settings_of(grid)
    if saver is None:
        print(f"warning: no SaveImage in {a.workflow} saves the images node {scorer} scores: the CSV gets no image paths.",
              file=sys.stderr)
    seeds = [a.seed + i for i in range(a.seeds)]
    clients = connect(a)
    try:
        for client in clients:
            client.check_nodes({n["class_type"] for n in workflow.values()})
        # one batch job per reference x prompt x seed x setting (innermost, so the server's cache keeps the
        # reference's encoding across settings); local files (reference, ground truth) are uploaded by the runner
        jobs = []
        for ri, ref in enumerate(refs):
            label = os.path.basename(ref)
            for pi, prompt in enumerate(prompts):
                for seed in seeds:
                    for gi, setting in enumerate(settings):
                        inputs = [(nid, name, os.path.abspath(ref)) for nid, name in marks["reference"]]
                        if gt_node:
                            inputs.append((gt_node, "image", os.path.abspath(gts[ref])))
                        uploads = set(range(len(inputs)))
                        inputs += [(nid, name, prompt) for nid, name in marks["prompt"]]
                        inputs += [(nid, name, seed) for nid, name in marks["seed"]]
                        inputs += [(nid, name, setting[addr]) for addr, targets, _ in grid for nid, name in targets]
                        stem = f"{ri:03d}_{os.path.splitext(label)[0]}_p{pi:02d}_s{seed}" + (f"_g{gi:02d}" if grid else "")
                        jobs.append(batch.Job(stem, len(jobs), {"reference": label, "prompt": prompt, "seed": seed, **setting},
                                              inputs, uploads, data=(label, prompt, seed, stem, setting)))
        rows_of: dict[int, list] = {}

        def collect(job, client, entry):
            label, prompt, seed, stem, setting = job.data
            return {"rows": [score_row(label, prompt, seed, s, img, setting=setting)
                             for s, img in scored_images(client, entry, scorer, saver, stem, a.out)]}

        def on_record(job, rec):  # called once per run, in the order they finish
            label, prompt, seed, _, setting = job.data
            if rec["status"] == "done":
                new = rec["rows"]
                status = "; ".join((f"similarity {r['similarity']:.4f} ssim {r['ssim']:.4f} psnr {r['psnr']:.2f}"
                                    + (f" sim_gt {r['sim_gt']:.4f} copy_paste {r['copy_paste']:+.4f}" if r["copy_paste"] != "" else ""))
                                   if r["face_found"] else "no face" for r in new)
            else:
                new = [score_row(label, prompt, seed, error=one_line(rec["error"]), setting=setting)]
                status = f"FAILED: {new[0]['error']}"
            rows_of[job.index] = new
            where = " | ".join([label, prompt, f"seed {seed}"] + ([setting_label(setting)] if grid else []))
            print(f"[{len(rows_of)}/{len(jobs)}] {where}: {status}", flush=True)
            rows = [r for k in sorted(rows_of) for r in rows_of[k]]  # the table in reference x prompt x seed order
            points = chart_points(rows, grid)
            png = chart_png(points) if points else None
            if png:
                write_atomic(os.path.join(a.out, CHART_NAME), png)
            elif points and not warned:
                warned.append(True)
                print("warning: no chart: Pillow is not importable by this Python (run the benchmark with ComfyUI's "
                      "Python, or pip install pillow).", file=sys.stderr)
            write_atomic(os.path.join(a.out, CSV_NAME), csv_text(rows, grid))
            write_atomic(os.path.join(a.out, MD_NAME), markdown(rows, prompts, len(refs), len(seeds), a.workflow, grid,
                                                                chart=bool(png)))

        warned = []

        runner = batch.Runner(workflow, jobs, clients, collector=collect, on_record=on_record, timeout=a.timeout,
                              server_timeout=30.0, progress=batch.Progress(len(jobs), bar=False))
        summary = runner.run()
    finally:
        for client in clients:
            if isinstance(client, ComfyServer):
                client.stop()
    rows = [r for k in sorted(rows_of) for r in rows_of[k]]
    if summary["stopped"]:
        print(f"stopped; the results so far are in {a.out}.", file=sys.stderr)
        return 130
    if summary["not_run"]:
        raise ConnectionError(f"{summary['not_run']} run(s) not done: no server left")
    failed = summarize(rows)["failed"]
    total = len(jobs)
    chart = os.path.join(a.out, CHART_NAME)
    print(f"wrote {os.path.join(a.out, CSV_NAME)} and {os.path.join(a.out, MD_NAME)}"
          + (f" and {chart}" if os.path.isfile(chart) else "") + (f"; {failed} of {total} run(s) failed" if failed else ""))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Face benchmark: reference folder x prompts x seeds x settings through a "
                                "ComfyUI workflow; writes face_benchmark.csv, face_benchmark.md and, with --ground-truth, "
                                "face_benchmark_chart.png (fidelity against copy-paste).")
    p.add_argument("--faces", required=True, help="folder of reference photos, one per reference")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (# comments and blank lines ignored)")
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="API-format workflow with the reference/prompt/seed "
                   "title markers and an IDFusionFaceEvaluate node (default: %(default)s)")
    p.add_argument("--out", required=True, help="results folder: face_benchmark.csv, face_benchmark.md, images/")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", action="append", help=f"a running ComfyUI server (default: {DEFAULT_URL}); repeat it to "
                       "spread the runs over several servers")
    where.add_argument("--base", help="start a ComfyUI server of its own with this base directory (models/, input/, "
                       "output/ and custom_nodes/ live there; see scripts/comfy_server.py)")
    p.add_argument("--comfyui", default=None, help="with --base: ComfyUI directory (default: $COMFYUI_PATH or .hosts/0.3.75/ComfyUI)")
    p.add_argument("--python", default=None, help="with --base: Python for the server (default: the host's venv)")
    p.add_argument("--ground-truth", default=None, help="folder with another photo of each reference person, named like "
                   "its reference (anna.png <-> anna.jpg): adds Sim(GT), copy-paste M_CP and the chart")
    p.add_argument("--grid", action="append", help="TITLE.INPUT=V1,V2,... : run every value (repeat for a grid of "
                   "settings), e.g. --grid 'IDFusion Apply.weight=0.6,0.8,1.0'; the chart has one point per setting")
    p.add_argument("--seeds", type=int, default=1, help="seeds per reference and prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="with --base: seconds to wait for the server")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
    try:
        return benchmark(a)
    except (BenchmarkError, ComfyServerError) as e:
        print(f"error: {e}", file=sys.stderr)
    except (urllib.error.URLError, ConnectionError) as e:  # the server went away between runs
        print(f"error: lost the connection to ComfyUI ({getattr(e, 'reason', e)}); the results so far are in {a.out}.",
              file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
