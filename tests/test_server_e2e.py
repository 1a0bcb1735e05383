"""End to end through a REAL ComfyUI server: main.py --cpu in a temporary base directory with this pack
linked into its custom_nodes, a random-weight SD1.5 checkpoint, and workflows/api/idfusion_basic_api.json
queued over HTTP. Works on either pinned host: ComfyUI from COMFYUI_PATH (see conftest.py), the server
runs under this Python (the host's venv)."""
import copy
import os
import shutil
import sys

import pytest
from PIL import Image

import comfy_server  # scripts/ is on sys.path (conftest.py)
from conftest import COMFYUI, ROOT, running_server

pytestmark = pytest.mark.e2e

WORKFLOW = os.path.join(ROOT, "workflows", "api", "idfusion_basic_api.json")
REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint):
    base = tmp_path_factory.mktemp("comfy_base")
    os.makedirs(base / "input")
    os.makedirs(base / "models" / "checkpoints")
    shutil.copyfile(REFERENCE, base / "input" / "idfusion_reference.png")
    os.symlink(random_checkpoint, base / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors")  # the name the workflows use
    with running_server(str(base)) as srv:
        yield srv


def test_pack_nodes_registered(server):
    expected = set(sys.modules["idfusion_pack"].NODE_CLASS_MAPPINGS)
    assert expected, "the pack registers no nodes"
    info = server.object_info()
    assert expected <= set(info), f"missing in /object_info: {sorted(expected - set(info))}"
    for name in expected:  # loaded from the linked pack, not from somewhere else
        assert info[name]["python_module"] == "custom_nodes.ComfyUI-IDFusion", info[name]["python_module"]
    assert set(comfy_server.pack_node_names()) == expected


def test_basic_workflow_writes_image(server):
    images = server.run(comfy_server.load_workflow(WORKFLOW), timeout=300)
    assert len(images) == 1, images
    path = images[0]
    assert os.path.dirname(path) == server.dir("output")
    assert os.path.basename(path).startswith("IDFusion_demo") and path.endswith(".png")
    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (64, 64)
    assert os.listdir(server.dir("output")) == [os.path.basename(path)]


def test_validation_error_is_reported(server):
    prompt = comfy_server.load_workflow(WORKFLOW)
    prompt["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(comfy_server.ComfyServerError, match="ckpt_name"):
        server.queue(prompt)


def test_node_exception_is_reported(server):
    """The pack's own error (start_at >= end_at) comes back with the node and the server's traceback.
    The loader/adapter/encoding outputs are cached from the previous run, so this fails fast."""
    prompt = copy.deepcopy(comfy_server.load_workflow(WORKFLOW))
    prompt["5"]["inputs"].update(start_at=0.8, end_at=0.2)
    with pytest.raises(comfy_server.ComfyServerError) as e:
        server.run(prompt, timeout=300)
    msg = str(e.value)
    print(msg)
    assert "node 5 (IDFusionApply)" in msg and "ValueError" in msg and "must be smaller than end_at" in msg, msg
    assert "apply_nodes.py" in msg, msg  # the server's traceback is passed on


def test_multi_identity_workflow_writes_image(server):
    """Two identities placed left/right with masks built from ComfyUI's own mask nodes."""
    wf = comfy_server.load_workflow(os.path.join(ROOT, "workflows", "api", "idfusion_multi_identity_api.json"))
    images = server.run(wf, timeout=300)
    assert len(images) == 1 and os.path.basename(images[0]).startswith("IDFusion_multi")
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)


def test_face_repaint_workflow_repaints_only_the_face(server):
    """Face tooling over HTTP: Haar detection on a real photo (scikit-image's astronaut), crop with context,
    masked re-sampling with the identity, stitch back. Outside the repainted box the photo is unchanged."""
    import numpy as np
    from skimage import data
    Image.fromarray(data.astronaut()).save(os.path.join(server.dir("input"), "astronaut.png"))
    wf = comfy_server.load_workflow(os.path.join(ROOT, "workflows", "api", "idfusion_face_repaint_api.json"))
    wf["19"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
    wf["12"]["inputs"].update(image=["19", 0], size=64, no_face="error")   # a face must be found
    wf["15"]["inputs"].update(steps=2)
    images = server.run(wf, timeout=300)
    assert len(images) == 1
    with Image.open(images[0]) as im:
        out = np.asarray(im.convert("RGB")).astype(int)
    src = data.astronaut().astype(int)
    assert out.shape == src.shape
    changed = np.argwhere(np.abs(out - src).sum(-1) > 0)
    assert len(changed) > 0, "nothing was repainted"
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert (y1 - y0) * (x1 - x0) < 0.4 * src.shape[0] * src.shape[1], "the repaint spilled beyond the face"


def torch_image(rgb):
    import numpy as np
    import torch
    return torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)[None]


def test_face_benchmark_cli_scores_what_the_evaluate_node_computes(server, tmp_path):
    """scripts/face_benchmark.py end to end over HTTP: uploads each reference, fills the workflow's title markers,
    queues the shipped benchmark workflow per reference x prompt and writes the CSV and the markdown summary. Its
    scores are IDFusionFaceEvaluate's for the images it saved. A reference that is not an image fails its runs, which
    are recorded and counted while the benchmark goes on."""
    import csv
    import json
    import math
    import subprocess
    import numpy as np
    from skimage import data
    import face_models as fm
    import random_models
    from idfusion_pack.idfusion import faces as F
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    from idfusion_pack.nodes import eval_nodes
    # the server's models: an adapter for the random checkpoint, and tiny ONNX models with insightface's signatures
    # as "antelopev2" (a detector that places the astronaut's face, an ArcFace-shaped recognizer)
    insightface = os.path.join(server.dir("models"), "insightface")
    pack = os.path.join(insightface, "models", "antelopev2")
    os.makedirs(pack, exist_ok=True)
    fm.make_detector(os.path.join(pack, "det_test.onnx"), [(177, 67, 270, 160, 0.9)], (512, 512))
    fm.make_recognizer(os.path.join(pack, "rec_test.onnx"))
    os.makedirs(os.path.join(server.dir("models"), "idfusion"), exist_ok=True)
    IDFusionAdapter.fresh(random_models.build_model("SD15", device="meta"), init="random").save(
        os.path.join(server.dir("models"), "idfusion", "idfusion_adapter.safetensors"))

    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(data.astronaut()).save(faces / "astronaut.png")
    (faces / "broken.jpg").write_bytes(b"not an image")
    (faces / "notes.txt").write_text("not a reference")
    prompts = ["a photo of a person smiling", "a portrait | studio light"]
    (tmp_path / "prompts.txt").write_text(f"# benchmark prompts\n{prompts[0]}\n\n  {prompts[1]}\n{prompts[0]}\n")
    wf = comfy_server.load_workflow(os.path.join(ROOT, "workflows", "api", "idfusion_face_benchmark_api.json"))
    # small on CPU: reference crop, latent, score crop; one step, and cfg 1 (ComfyUI then skips the uncond pass)
    wf["5"]["inputs"]["size"] = wf["14"]["inputs"]["size"] = 64
    wf["10"]["inputs"].update(width=64, height=64)
    wf["11"]["inputs"].update(steps=1, cfg=1.0)
    (tmp_path / "workflow.json").write_text(json.dumps(wf))
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "face_benchmark.py"), "--faces", str(faces),
                        "--prompts", str(tmp_path / "prompts.txt"), "--workflow", str(tmp_path / "workflow.json"),
                        "--out", str(out), "--url", server.url, "--seed", "7"], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr)
    assert r.returncode == 1, "two runs failed, so the exit status is 1"

    with open(out / "face_benchmark.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("reference", "prompt", "seed", "face_found", "similarity", "distance",
                                            "ssim", "psnr", "sim_gt", "copy_paste", "leakage", "id_conf", "faces",
                                            "image", "error")   # issue 20's identity columns (empty: no ground truth, one face)
        rows = list(reader)
    assert [(x["reference"], x["prompt"], x["seed"]) for x in rows] == \
        [("astronaut.png", p, "7") for p in prompts] + [("broken.jpg", p, "7") for p in prompts]
    fa = F.load_insightface("antelopev2", [insightface])
    reference = torch_image(data.astronaut())
    for row in rows[:2]:
        assert row["error"] == "" and row["face_found"] == "True", row
        got = {k: float(row[k]) for k in ("similarity", "distance", "ssim", "psnr")}
        assert all(math.isfinite(v) for v in got.values()) and got["distance"] == pytest.approx(1 - got["similarity"])
        with Image.open(out / row["image"]) as im:
            generated = np.asarray(im.convert("RGB"))
        assert generated.shape == (64, 64, 3)
        sim, _, ssim, psnr, found, _ = eval_nodes.IDFusionFaceEvaluate().evaluate(fa, torch_image(generated), reference, 64, 0.0)["result"]
        # The server scored the decoded image, which SaveImage then truncated to 8 bits: equal up to that (seen:
        # similarity 1e-3, SSIM 5e-4, PSNR 0.006 dB apart; the two prompts' images score 1e-2 apart in similarity)
        assert found and got["similarity"] == pytest.approx(sim, abs=3e-3) and got["ssim"] == pytest.approx(ssim, abs=2e-3) \
            and got["psnr"] == pytest.approx(psnr, abs=0.05), (got, (sim, ssim, psnr))
    assert not np.array_equal(*(np.asarray(Image.open(out / x["image"])) for x in rows[:2])), "both prompts gave one image"
    for row in rows[2:]:
        assert "LoadImage" in row["error"] and row["similarity"] == row["image"] == "", row

    md = (out / "face_benchmark.md").read_text()
    print(md)
    assert "2 reference(s) x 2 prompt(s) x 1 seed(s) = 4 run(s); 4 done, 2 failed" in md
    assert "| prompt | n | failed runs | face found | similarity | distance | SSIM | PSNR |" in md
    mean = {k: sum(float(x[k]) for x in rows[:2]) / 2 for k in ("similarity", "distance", "ssim", "psnr")}
    assert (f"| **all** | 2 | 2 | 100% | {mean['similarity']:.4f} | {mean['distance']:.4f} | {mean['ssim']:.4f} "
            f"| {mean['psnr']:.2f} |") in md
    assert f"| a portrait \\| studio light | 1 | 1 | 100% | {float(rows[1]['similarity']):.4f} |" in md
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

