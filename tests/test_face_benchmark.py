"""scripts/face_benchmark.py without a server: the shipped workflow's markers and nodes, and the errors a user gets
for bad inputs before anything is queued. The run over HTTP is in test_server_e2e.py (it reuses that server)."""
import json
import os

import pytest

import comfy_server  # scripts/ is on sys.path (conftest.py)
import face_benchmark
from conftest import ROOT

WORKFLOW = os.path.join(ROOT, "workflows", "api", "idfusion_face_benchmark_api.json")


@pytest.fixture
def inputs(tmp_path):
    """A faces folder with one photo, a prompt file, a copy of the shipped workflow, and an address nobody serves."""
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "me.png").write_bytes(open(os.path.join(ROOT, "workflows", "assets", "reference_face.png"), "rb").read())
    (tmp_path / "prompts.txt").write_text("a photo of a person\n")
    wf = tmp_path / "workflow.json"
    wf.write_text(open(WORKFLOW).read())
    nobody = f"http://127.0.0.1:{comfy_server.free_port()}"
    return dict(faces=faces, prompts=tmp_path / "prompts.txt", workflow=wf, out=tmp_path / "out", url=nobody)


def bench(capsys, **kw):
    argv = []
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    rc = face_benchmark.main(argv)
    return rc, capsys.readouterr().err


def test_shipped_workflow_has_the_markers_and_known_nodes():
    import idfusion_pack
    import nodes as comfy_nodes
    wf = comfy_server.load_workflow(WORKFLOW)
    marks = face_benchmark.marked_inputs(wf, WORKFLOW)
    assert {m: [(wf[n]["class_type"], i) for n, i in v] for m, v in marks.items()} == {
        "reference": [("LoadImage", "image")], "prompt": [("CLIPTextEncode", "text")], "seed": [("KSampler", "seed")]}
    scorer, saver = face_benchmark.scorer_and_saver(wf, WORKFLOW)
    assert wf[scorer]["class_type"] == "IDFusionFaceEvaluate" and wf[saver]["class_type"] == "SaveImage"
    known = {**comfy_nodes.NODE_CLASS_MAPPINGS, **idfusion_pack.NODE_CLASS_MAPPINGS}
    for nid, n in wf.items():
        spec = known[n["class_type"]].INPUT_TYPES()
        assert set(n["inputs"]) <= {*spec["required"], *spec.get("optional", {})}, nid
        assert set(spec["required"]) <= set(n["inputs"]), nid
        assert all(v[0] in wf for v in n["inputs"].values() if isinstance(v, list)), nid


def test_missing_marker_says_which_title_to_set(inputs, capsys):
    wf = json.loads(inputs["workflow"].read_text())
    wf["3"]["_meta"]["title"] = "Reference face"
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)   # fails on the workflow before it looks for the (absent) server
    assert rc == 2
    assert "no node is titled 'reference'" in err and "Title the LoadImage of the reference photo 'reference'" in err, err
    assert not inputs["out"].exists()


def test_doubled_marker_and_missing_scorer(inputs, capsys):
    wf = json.loads(inputs["workflow"].read_text())
    wf["9"]["_meta"]["title"] = "Prompt"
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)
    assert rc == 2 and "nodes 8, 9 are all titled 'prompt'" in err, err
    wf["9"]["_meta"]["title"] = "negative"
    del wf["14"]
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)
    assert rc == 2 and "needs exactly one IDFusionFaceEvaluate node" in err, err


def test_bad_inputs_are_named(inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    rc, err = bench(capsys, **{**inputs, "faces": empty})
    assert rc == 2 and "has no reference images" in err, err

    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n   \n")
    rc, err = bench(capsys, **{**inputs, "prompts": comments})
    assert rc == 2 and "has no prompts" in err, err

    ui_format = tmp_path / "ui.json"
    ui_format.write_text(json.dumps({"last_node_id": 3, "nodes": [{"id": 1, "type": "LoadImage"}], "links": []}))
    rc, err = bench(capsys, **{**inputs, "workflow": ui_format})
    assert rc == 2 and "is not an API-format workflow (export it with 'Save (API)')" in err, err

    rc, err = bench(capsys, **inputs)   # all inputs fine, nobody at the address
    assert rc == 2 and f"Cannot reach ComfyUI at {inputs['url']}" in err and "--base DIR" in err, err


# ---------------------------------------------------------------------------------------------- ground truth, grid, chart

def test_ground_truth_folder_is_matched_by_name(tmp_path, capsys, inputs):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "someone_else.jpg").write_bytes(b"x")
    rc, err = bench(capsys, **inputs, **{"ground-truth": gt})
    assert rc == 2 and "has no photo named like reference(s) me.png" in err and "me.jpg" in err, err
    (gt / "me.webp").write_bytes(b"x")
    refs = [str(inputs["faces"] / "me.png")]
    assert face_benchmark.ground_truths(str(gt), refs) == {refs[0]: str(gt / "me.webp")}
    assert face_benchmark.ground_truths(None, refs) == {}


def test_ground_truth_input_is_added_or_reused():
    wf = comfy_server.load_workflow(WORKFLOW)
    scorer, _ = face_benchmark.scorer_and_saver(wf, WORKFLOW)
    out, nid = face_benchmark.ground_truth_input(wf, scorer)
    assert "ground_truth" not in wf[scorer]["inputs"], "the caller's workflow is not changed"
    assert out[nid] == {"class_type": "LoadImage", "inputs": {"image": ""}, "_meta": {"title": "ground truth"}}
    assert out[scorer]["inputs"]["ground_truth"] == [nid, 0] and nid not in wf
    again, nid2 = face_benchmark.ground_truth_input(out, scorer)   # already wired: the same node
    assert nid2 == nid and again == out


def test_grid_values_take_the_inputs_types(inputs, capsys):
    wf = comfy_server.load_workflow(WORKFLOW)
    grid = face_benchmark.parse_grid(["IDFusion Apply.weight=0.5, 1", "KSampler.steps=2,4", "idfusion apply.uncond=text only"], wf)
    assert [(a, t, v) for a, t, v in grid] == [("IDFusion Apply.weight", [("7", "weight")], [0.5, 1.0]),
                                              ("KSampler.steps", [("11", "steps")], [2, 4]),
                                              ("idfusion apply.uncond", [("7", "uncond")], ["text only"])]
    assert all(type(v) is float for v in grid[0][2]) and all(type(v) is int for v in grid[1][2])
    settings = face_benchmark.settings_of(grid)
    assert len(settings) == 4 and settings[1] == {"IDFusion Apply.weight": 0.5, "KSampler.steps": 4, "idfusion apply.uncond": "text only"}
    assert face_benchmark.setting_label(settings[1]) == "weight=0.5, steps=4, uncond=text only"
    assert face_benchmark.settings_of([]) == [{}]
    for bad, msg in [("IDFusion Apply.weight", "write TITLE.INPUT=V1,V2"), ("KSampler.steps=2,three", "'three' is not a int"),
                     ("KSampler.model=1", "is connected to another node"), ("Nobody.weight=1", "no node of the workflow is titled 'Nobody'")]:
        rc, err = bench(capsys, **inputs, grid=bad)
        assert rc == 2 and msg in err, (bad, err)


def test_rows_summary_and_markdown_with_identity_scores():
    scores = {"found": True, "similarity": 0.8, "distance": 0.2, "ssim": 0.5, "psnr": "inf", "sim_gt": 0.6,
              "copy_paste": 0.25, "leakage": None, "id_conf": None, "faces": [{"box": [1, 2, 3, 4], "match": 0}]}
    st = {"IDFusion Apply.weight": 0.5}
    a = face_benchmark.score_row("me.png", "p", 0, scores, "images/x.png", setting=st)
    b = face_benchmark.score_row("me.png", "p", 1, {**scores, "sim_gt": 0.2, "copy_paste": -0.75, "leakage": 0.1}, setting=st)
    c = face_benchmark.score_row("me.png", "p", 2, error="boom", setting=st)
    assert a["psnr"] == float("inf") and a["leakage"] == "" and json.loads(a["faces"]) == [{"box": [1, 2, 3, 4], "match": 0}]
    assert c["sim_gt"] == c["faces"] == "" and c["IDFusion Apply.weight"] == 0.5
    s = face_benchmark.summarize([a, b, c])
    assert (s["n"], s["failed"], s["sim_gt"], s["copy_paste"], s["leakage"]) == (2, 1, pytest.approx(0.4), pytest.approx(-0.25), pytest.approx(0.1))
    assert face_benchmark.summarize([a])["id_conf"] != face_benchmark.summarize([a])["id_conf"]  # nan: nowhere defined
    grid = [("IDFusion Apply.weight", [("7", "weight")], [0.5])]
    md = face_benchmark.markdown([a, b, c], ["p"], 1, 3, WORKFLOW, grid, chart=True)
    assert "1 reference(s) x 1 prompt(s) x 3 seed(s) x 1 setting(s) = 3 run(s); 3 done, 1 failed" in md, md
    assert "![fidelity against copy-paste: Sim(GT) over M_CP](face_benchmark_chart.png)" in md
    assert "| weight=0.5 | 2 | 1 | 100% | 0.8000 | 0.2000 | 0.5000 | inf | 0.4000 | -0.2500 | 0.1000 | - |" in md, md
    text = face_benchmark.csv_text([a, b, c], grid)
    assert text.splitlines()[0] == ("reference,prompt,seed,IDFusion Apply.weight,face_found,similarity,distance,ssim,psnr,"
                                    "sim_gt,copy_paste,leakage,id_conf,faces,image,error")
    assert face_benchmark.chart_points([a, b, c], grid) == [("weight=0.5", pytest.approx(-0.25), pytest.approx(0.4))]
    assert [p[0] for p in face_benchmark.chart_points([a, b, c], [])] == ["me.png | p | seed 0", "me.png | p | seed 1"]


def test_chart_places_each_point_by_its_scores():
    import io
    from PIL import Image
    png = face_benchmark.chart_png([("a", -0.5, 0.8), ("b", 0.5, 0.3)])
    im = Image.open(io.BytesIO(png)).convert("RGB")
    assert im.size == (720, 520)
    # axes span M_CP -1..1 over x 64..696 and Sim(GT) 0..1 over y 464..40
    px = lambda x: round(64 + (x + 1) / 2 * 632)
    py = lambda y: round(464 - y * 424)
    assert im.getpixel((px(-0.5), py(0.8))) == (230, 25, 75) and im.getpixel((px(0.5), py(0.3))) == (60, 180, 75)
    assert im.getpixel((px(0.3), py(0.7))) == (255, 255, 255)   # nothing between the points


@pytest.mark.e2e
def test_benchmark_over_http_with_ground_truth_and_a_grid(tmp_path, random_checkpoint):
    """The whole CLI through a real server: a weight grid of two settings with a ground-truth photo. Every row has
    Sim(GT) and M_CP equal to what Face Evaluate computes here on the saved image, the settings change the pictures,
    and the chart has one point per setting at its mean scores."""
    import csv
    import io
    import math
    import shutil
    import subprocess
    import sys
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data
    import face_models as fm
    import random_models
    from conftest import running_server
    from idfusion_pack.idfusion import faces as F
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    from idfusion_pack.nodes import eval_nodes

    base = tmp_path / "base"
    for d in ("input", "models/checkpoints", "models/idfusion", "models/insightface/models/antelopev2"):
        (base / d).mkdir(parents=True)
    os.symlink(random_checkpoint, base / "models" / "checkpoints" / "random_sd15.safetensors")
    pack = base / "models" / "insightface" / "models" / "antelopev2"
    fm.make_detector(pack / "det_test.onnx", [(177, 67, 270, 160, 0.9)], (512, 512))   # the astronaut's face
    fm.make_recognizer(pack / "rec_test.onnx")
    IDFusionAdapter.fresh(random_models.build_model("SD15", device="meta"), init="random").save(
        str(base / "models" / "idfusion" / "idfusion_adapter.safetensors"))
    faces, gt = tmp_path / "faces", tmp_path / "gt"
    faces.mkdir()
    gt.mkdir()
    astro = data.astronaut()
    Image.fromarray(astro).save(faces / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astro[:, ::-1])).save(gt / "astronaut.jpg", quality=95)  # another photo of her
    (tmp_path / "prompts.txt").write_text("a photo of a person\n")
    wf = comfy_server.load_workflow(WORKFLOW)
    wf["1"]["inputs"]["ckpt_name"] = "random_sd15.safetensors"
    wf["5"]["inputs"]["size"] = wf["14"]["inputs"]["size"] = 64
    wf["10"]["inputs"].update(width=64, height=64)
    wf["11"]["inputs"].update(steps=1, cfg=1.0)
    (tmp_path / "workflow.json").write_text(json.dumps(wf))
    out = tmp_path / "results"
    with running_server(base) as server:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "face_benchmark.py"), "--faces", str(faces),
                            "--prompts", str(tmp_path / "prompts.txt"), "--workflow", str(tmp_path / "workflow.json"),
                            "--out", str(out), "--url", server.url, "--ground-truth", str(gt),
                            "--grid", "IDFusion Apply.weight=0,1"], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    with open(out / "face_benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [x["IDFusion Apply.weight"] for x in rows] == ["0.0", "1.0"]
    fa = F.load_insightface("antelopev2", [str(base / "models" / "insightface")])
    as_image = lambda rgb: torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)[None]
    images = []
    for row in rows:
        with Image.open(out / row["image"]) as im:
            images.append(np.asarray(im.convert("RGB")))
        with Image.open(gt / "astronaut.jpg") as im:
            truth = np.asarray(im.convert("RGB"))
        with torch.inference_mode():
            here = eval_nodes.IDFusionFaceEvaluate().evaluate(fa, as_image(images[-1]), as_image(astro), 64, 0.0,
                                                              ground_truth=as_image(truth))["ui"]["idfusion_scores"][0]
        got = {k: float(row[k]) for k in ("similarity", "sim_gt", "copy_paste")}
        assert all(math.isfinite(v) for v in got.values()) and row["leakage"] == row["id_conf"] == "", row
        # the server scored the decoded image before SaveImage's 8-bit rounding: equal up to that
        assert got["sim_gt"] == pytest.approx(here["sim_gt"], abs=3e-3) and got["copy_paste"] == pytest.approx(here["copy_paste"], abs=0.05), (got, here)
        assert json.loads(row["faces"])[0]["match"] == 0
    assert not np.array_equal(*images), "the weight grid did not change the pictures"
    md = (out / "face_benchmark.md").read_text()
    print(md)
    assert "x 2 setting(s) = 2 run(s); 2 done, 0 failed" in md and "| weight=0.0 | 1 | 0 | 100% |" in md
    chart = Image.open(io.BytesIO((out / "face_benchmark_chart.png").read_bytes())).convert("RGB")
    points = face_benchmark.chart_points([face_benchmark.score_row(x["reference"], x["prompt"], x["seed"], {
        **{k: float(x[k]) for k in ("similarity", "distance", "ssim", "psnr", "sim_gt", "copy_paste")}, "found": True})
        | {"IDFusion Apply.weight": float(x["IDFusion Apply.weight"])} for x in rows],
        [("IDFusion Apply.weight", [], [0.0, 1.0])])
    assert len(points) == 2
    x0, x1 = min([-1.0] + [p[1] for p in points]), max([1.0] + [p[1] for p in points])
    y0, y1 = min([0.0] + [p[2] for p in points]), max([1.0] + [p[2] for p in points])
    for (label, cp, sg), colour in zip(points, [(230, 25, 75), (60, 180, 75)]):
        px, py = 64 + (cp - x0) / (x1 - x0) * 632, 464 - (sg - y0) / (y1 - y0) * 424
        # each point's dot (radius 5) shows its colour around its place (the two may overlap: the runs differ little)
        near = {chart.getpixel((round(px) + dx, round(py) + dy)) for dx in range(-4, 5) for dy in range(-4, 5)}
        assert colour in near, (label, cp, sg)
