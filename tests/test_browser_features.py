"""The js/ extension in the REAL frontend (host 0.3.75, frontend 1.32.9, headless Debian chromium via Playwright), one
ComfyUI server for the module: per feature, load a workflow in the page, queue it from the page, wait for the
websocket's `executed`, and check what the page shows (DOM text, widget values, canvas pixels). Screenshots go to
<tmp>/screens and /work/helpers/screens (or $IDFUSION_SCREENS).

Also the read-only route behind the Load Adapter panel (GET /idfusion/file_info), over plain HTTP.
"""
import json
import os
import shutil
import sys
import urllib.error
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

import ui_browser  # scripts/ is on sys.path (conftest.py)
from conftest import ROOT, running_server

pytestmark = pytest.mark.e2e

SYNTHETIC_MODEL = os.path.join(ROOT, "models", "synthetic_faces.safetensors")
SYNTHETIC_REFS = os.path.join(ROOT, "workflows", "assets", "synthetic")




def _adapters(models):
    """Adapter files as users have them: a fresh SD1.5-shaped one, one with per-step encoding and a training state
    (its checkpoint metadata, as the trainer writes it), a file of another tool, a truncated one."""
    import random_models
    from idfusion_pack.idfusion.adapter import IDFusionAdapter, find_layers, save_safetensors_atomic
    d = os.path.join(models, "idfusion")
    sd15 = random_models.build_model("SD15", device="meta")
    IDFusionAdapter.fresh(sd15, init="zeros").save(os.path.join(d, "sd15_adapter.safetensors"))
    layers = find_layers(sd15.model.diffusion_model)[:3]
    IDFusionAdapter(layers, "SDXL", {"mode": "per_step", "timestep": 7, "text": "empty"}).save(os.path.join(d, "per_step_adapter.safetensors"))
    save_safetensors_atomic({"step_marker": torch.zeros(1)}, os.path.join(d, "training", "per_step_adapter.train-state.safetensors"),
                            {"format": "idfusion.train_state", "format_version": "1", "step": "12", "config": json.dumps({"steps": 20})})
    save_safetensors_atomic({"w": torch.zeros(2, 2)}, os.path.join(d, "lora_of_another_pack.safetensors"), {"format": "pt"})
    # a valid header whose tensor bytes are cut off: reading the header must be enough
    path = os.path.join(d, "truncated.safetensors")
    IDFusionAdapter.fresh(sd15, init="zeros").save(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    from helpers import random_identity   # identity files in both formats (format 2 is what Save Identity writes)
    os.makedirs(os.path.join(d, "identities"))
    ann = random_identity(sd15, refs=2, name="ann")
    ann.save(os.path.join(d, "identities", "ann_compact.safetensors"))
    ann.save(os.path.join(d, "identities", "ann_full.safetensors"), with_h_f=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import face_models as fm
    from skimage import data
    base = str(tmp_path_factory.mktemp("comfy_base_features"))
    ui_browser.seed_user_settings(base)
    models = os.path.join(base, "models")
    pack = os.path.join(models, "insightface", "models", "antelopev2")  # tiny ONNX stand-ins (tests/face_models.py)
    os.makedirs(pack)
    fm.make_detector(os.path.join(pack, "det_test.onnx"), [(177, 67, 270, 160, 0.9)], (512, 512))
    fm.make_recognizer(os.path.join(pack, "rec_test.onnx"))
    os.makedirs(os.path.join(models, "idfusion", "training"))
    _adapters(models)
    os.makedirs(os.path.join(base, "input"))
    Image.fromarray(data.astronaut()).save(os.path.join(base, "input", "astronaut.png"))
    with running_server(base) as srv:
        yield srv


def panel(page, node_id, cls):
    return page.evaluate("([id, cls]) => { const n = app.graph.getNodeById(id);"
                         " const el = n.widgets.find((w) => w.element?.classList.contains(cls))?.element;"
                         " return el ? { text: el.innerText, data: { ...el.dataset },"
                         " clipped: el.scrollHeight > el.clientHeight + 1 || el.scrollWidth > el.clientWidth + 1,"
                         " dims: [el.scrollWidth, el.clientWidth, el.scrollHeight, el.clientHeight],"
                         " shown: el.getBoundingClientRect().height > 0 } : null; }", [node_id, cls])


# ---- Load Adapter: metadata panel from GET /idfusion/file_info ------------------------------------------------
def file_info(server, name):
    try:
        return 200, server.get_json("/api/idfusion/file_info?" + urllib.parse.urlencode({"name": name}))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def test_file_info_route_reads_only_listed_files_headers(server):
    code, info = file_info(server, "sd15_adapter.safetensors")
    assert code == 200 and info["family"] == "SD15" and info["layers"] == 16, info
    assert info["reference_encoding"] == {"mode": "cached", "timestep": 0, "text": "zeros"}
    assert info["training_steps"] is None
    code, info = file_info(server, "per_step_adapter.safetensors")
    assert info["training_steps"] == {"done": 12, "planned": 20}, info
    code, info = file_info(server, "truncated.safetensors")  # tensors cut off: the header alone answers
    assert code == 200 and info["layers"] == 16, info
    for name, h_f in (("identities/ann_compact.safetensors", "recomputed when applied"), ("identities/ann_full.safetensors", "stored")):
        code, info = file_info(server, name)
        assert code == 200 and info["references"] == 2 and info["identity_name"] == "ann" and info["h_f"] == h_f, info
    code, info = file_info(server, "lora_of_another_pack.safetensors")
    assert code == 422 and "not an IDFusion adapter" in info["error"], info
    # only names from the list: no paths, no files elsewhere, nothing without a name
    for name in ("../../user/comfyui.db", os.path.join(server.dir("models"), "idfusion", "sd15_adapter.safetensors"),
                 "../idfusion/sd15_adapter.safetensors", "identities/../sd15_adapter.safetensors", "missing.safetensors"):
        code, info = file_info(server, name)
        assert code == 404 and "not a file in the idfusion model folders" in info["error"], (name, info)
    code, info = file_info(server, "")
    assert code == 400, info


def loader_panel(page, class_type, inputs, title):
    """A graph of one loader node (id 1) and its file-info panel once the server's answer is shown."""
    ui_browser.clear_toasts(page)
    ui_browser.load_api(page, {"1": {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}}, title)
    page.wait_for_function("() => app.graph.getNodeById(1).widgets.find((w) => w.name === 'idfusion_file_info')"
                           ".element.dataset.state === 'ok'", timeout=15_000)
    return panel(page, 1, "idfusion-file-info")


def test_load_adapter_panel_shows_metadata_of_the_picked_file(page, screens):
    p = loader_panel(page, "IDFusionAdapterLoader", {"adapter_name": "sd15_adapter.safetensors"}, "IDFusion Load Adapter")
    assert "family: SD15" in p["text"] and "layers: 16" in p["text"], p
    assert "encoded: cached, timestep 0, text zeros" in p["text"], p
    assert "training steps: not recorded" in p["text"], p

    def pick(name):  # what choosing an entry of the combo does: set the value, call the widget's callback
        page.evaluate("(name) => { const w = app.graph.getNodeById(1).widgets.find((w) => w.name === 'adapter_name');"
                      " w.value = name; w.callback?.(name); }", name)
        page.wait_for_function("(name) => { const el = app.graph.getNodeById(1).widgets.find((w) => w.name === 'idfusion_file_info').element;"
                               " return el.dataset.state === 'ok' || el.dataset.state === 'error'; }", arg=name, timeout=15_000)
        page.wait_for_timeout(100)
        return panel(page, 1, "idfusion-file-info")

    p = pick("per_step_adapter.safetensors")
    assert "family: SDXL" in p["text"] and "layers: 3" in p["text"], p
    assert "per_step, timestep 7, text empty" in p["text"] and "training steps: 12 of 20" in p["text"], p
    ui_browser.fit_node(page, 1, 1.5)
    p = panel(page, 1, "idfusion-file-info")
    assert p["shown"] and not p["clipped"], f"the panel is cut off: {p}"
    screens(page, "feature_load_adapter_metadata")
    p = pick("lora_of_another_pack.safetensors")
    assert p["data"]["state"] == "error" and "not an IDFusion adapter" in p["text"], p
    page.wait_for_timeout(300)
    assert any("cannot read file metadata" in t for t in ui_browser.toasts(page)), ui_browser.toasts(page)
    # the panel never enters the prompt or the saved widget values
    prompt = ui_browser.graph_to_prompt(page)
    assert prompt["1"]["inputs"] == {"adapter_name": "lora_of_another_pack.safetensors"}, prompt
    assert ui_browser.serialize(page)["nodes"][0]["widgets_values"] == ["lora_of_another_pack.safetensors"]


def test_load_identity_panel_says_whether_the_file_stores_h_f(page):
    p = loader_panel(page, "IDFusionLoadIdentity", {"identity_name": "identities/ann_compact.safetensors"}, "IDFusion Load Identity")
    assert "identity: ann   references: 2" in p["text"] and "h_f: recomputed when applied" in p["text"], p


# ---- Face Evaluate: a score badge after a run ------------------------------------------------------------------
def test_face_evaluate_badge_shows_similarity_distance_and_face(page, screens):
    ui_browser.clear_toasts(page)
    ui_browser.load_api(page, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}, "_meta": {"title": "reference"}},
        "2": {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "y-axis: horizontally"},
              "_meta": {"title": "mirrored: another picture of her"}},
        "3": {"class_type": "IDFusionFaceAnalysisLoader", "inputs": {"model": "antelopev2", "provider": "CPU", "det_size": 640,
              "det_thresh": 0.5}, "_meta": {"title": "face analysis"}},
        "4": {"class_type": "IDFusionFaceEvaluate", "inputs": {"face_analysis": ["3", 0], "image": ["2", 0], "reference": ["1", 0],
              "size": 64, "margin": 0.0}, "_meta": {"title": "IDFusion Face Evaluate"}},
    }, "face_evaluate")
    before = panel(page, 4, "idfusion-score-badge")
    assert before["data"]["state"] == "empty", before
    state = ui_browser.queue(page, timeout_s=300)
    sent = next(e["output"]["idfusion_scores"] for e in state["executed"] if str(e["node"]) == "4")
    assert len(sent) == 1 and sent[0]["found"] is True
    page.wait_for_timeout(200)
    p = panel(page, 4, "idfusion-score-badge")
    assert p["data"]["state"] == "found", p
    assert f"similarity {sent[0]['similarity']:.3f}" in p["text"] and f"distance {sent[0]['distance']:.3f}" in p["text"], (p, sent)
    assert "face found" in p["text"], p
    assert float(p["data"]["similarity"]) == pytest.approx(sent[0]["similarity"])
    ui_browser.fit_node(page, 4, 1.5)
    p = panel(page, 4, "idfusion-score-badge")  # DOM widgets are only laid out while their node is on screen
    assert p["shown"] and not p["clipped"], f"the badge is cut off: {p}"
    screens(page, "feature_face_evaluate_badge")
    # the badge is drawn: its green "face found" chip is on screen
    chip = page.locator(".idfusion-face-chip").first.bounding_box()
    px = ui_browser.region_pixels(page, (chip["x"], chip["y"], chip["width"], chip["height"]))
    green = (np.abs(px - np.array([0x3f, 0xb9, 0x50])).sum(-1) < 40).mean()
    assert green > 0.3, f"chip is not green on screen ({green:.2f} of its pixels)"


# ---- the shipped synthetic-faces model: identity thumbnails, region overlay, training chart ----------------------
def _domain():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "synthetic"))
    import domain
    return domain


@pytest.fixture(scope="module")
def synthetic_inputs(server):
    """The references the synthetic workflows name (shipped in workflows/assets/synthetic/) and a small training set
    in input/idfusion_datasets/synthetic_faces (two identity folders drawn by the synthetic domain, captions from the
    model's vocabulary, 64 px: the training node's smallest resolution)."""
    D = _domain()
    inp = server.dir("input")
    for i in range(2):
        shutil.copyfile(os.path.join(SYNTHETIC_REFS, f"fresh_{i}.png"), os.path.join(inp, f"fresh_{i}.png"))
    idents = D.identities("training", 4)
    rng = np.random.default_rng(0)
    for who in range(2):
        d = os.path.join(inp, "idfusion_datasets", "synthetic_faces", f"person_{who}")
        os.makedirs(d, exist_ok=True)
        for k in range(3):
            scene = D.random_scene(rng)
            im, _ = D.render([idents[2 + who]], scene, rng)
            Image.fromarray(im).resize((64, 64), Image.NEAREST).save(os.path.join(d, f"{k}.png"))
            with open(os.path.join(d, f"{k}.txt"), "w") as f:
                f.write(D.caption(scene))
    return inp


def load_template(page, name, steps=None):
    """Open a shipped UI workflow (by its twin's name, e.g. idfusion_synthetic_demo); steps: set every KSampler's steps
    widget, as a user trying it quickly would."""
    import build_ui_workflows  # the template file of each twin
    with open(os.path.join(ROOT, "workflows", f"{build_ui_workflows.ui_name(name)}.json")) as f:
        ui_browser.load_ui(page, json.load(f), name)
    if steps:
        page.evaluate("(steps) => { for (const n of app.graph._nodes) if (n.type === 'KSampler') {"
                      " const w = n.widgets.find((w) => w.name === 'steps'); w.value = steps; w.callback?.(steps); } }", steps)


def shown_image(page, node_id):
    """node.imgs as the page loaded them (the stock frontend fills them only while the node is on screen)."""
    ui_browser.fit_node(page, node_id, 1.2)
    page.wait_for_function("(id) => (app.graph.getNodeById(id).imgs || []).length > 0 &&"
                           " app.graph.getNodeById(id).imgs.every((i) => i.complete && i.naturalWidth > 0)",
                           arg=node_id, timeout=15_000)
    return page.evaluate("(id) => app.graph.getNodeById(id).imgs.map((i) => i.src)", node_id)


def _near(px, rgb, tol=30):
    return np.abs(px - np.array(rgb)).sum(-1) < tol


def test_encode_reference_shows_thumbnails_with_caption(page, server, synthetic_inputs, screens):
    load_template(page, "idfusion_synthetic_demo", steps=2)
    ui_browser.fit_node(page, 4, 1.2)
    before = ui_browser.region_pixels(page, ui_browser.node_screen_rect(page, 4))
    state = ui_browser.queue(page, timeout_s=300)
    out = next(e["output"] for e in state["executed"] if str(e["node"]) == "4")
    assert len(out["images"]) == 1 and out["images"][0]["type"] == "temp", out
    srcs = shown_image(page, 4)
    assert len(srcs) == 1 and out["images"][0]["filename"] in urllib.parse.unquote(srcs[0]), srcs
    p = panel(page, 4, "idfusion-identity-caption")
    assert p["data"]["state"] == "shown" and "reference: 1 reference" in p["text"], p
    assert p["shown"] and not p["clipped"], f"the caption is cut off: {p}"
    # the thumbnail is drawn in the node: after the run, its background colour fills a block of the node's body
    thumb = np.asarray(Image.open(os.path.join(server.dir("temp"), out["images"][0]["filename"])).convert("RGB")).astype(int)
    after = ui_browser.region_pixels(page, ui_browser.node_screen_rect(page, 4))
    gained = int(_near(after, thumb[0, 0]).sum()) - int(_near(before, thumb[0, 0]).sum())
    assert gained > 0.25 * thumb.shape[0] * thumb.shape[1], f"the thumbnail's background {thumb[0, 0]} is not on screen ({gained} px)"
    screens(page, "feature_identity_thumbnails")


def test_multi_identity_shows_region_overlay(page, synthetic_inputs, screens):
    from idfusion_pack.idfusion.faces import PALETTE
    load_template(page, "idfusion_synthetic_two_identities", steps=2)
    state = ui_browser.queue(page, timeout_s=300)
    out = next(e["output"] for e in state["executed"] if str(e["node"]) == "12")
    assert len(out["images"]) == 1, out
    shown_image(page, 12)
    p = panel(page, 12, "idfusion-region-legend")
    assert p["data"]["state"] == "shown" and p["shown"] and not p["clipped"], p
    body = ui_browser.region_pixels(page, ui_browser.node_screen_rect(page, 12))
    first, second = _near(body, PALETTE[0]), _near(body, PALETTE[1])
    assert first.mean() > 0.02 and second.mean() > 0.02, (first.mean(), second.mean())
    xs = np.arange(body.shape[1])[None, :]
    left = (first * xs).sum() / first.sum()
    right = (second * xs).sum() / second.sum()
    assert left < right, "identity 1's colour should be on the left half, identity 2's on the right"
    screens(page, "feature_region_overlay")


def test_train_adapter_draws_live_loss_chart_and_keeps_it(page, synthetic_inputs, screens):
    load_template(page, "idfusion_training")
    # as a user would: fewer steps for a quick try
    page.evaluate("() => { const n = app.graph.getNodeById(2); for (const [k, v] of [['steps', 6], ['save_every', 3]])"
                  " { const w = n.widgets.find((w) => w.name === k); w.value = v; w.callback?.(v); } }")
    page.evaluate("""() => { window.__idfChart = []; const n = app.graph.getNodeById(2);
        new MutationObserver(() => window.__idfChart.push(Number(n.__idfusionChart.root.dataset.points)))
          .observe(n.__idfusionChart.root, { attributes: true }); }""")
    state = ui_browser.queue(page, timeout_s=600)
    events = [e for e in state["train"] if str(e["node"]) == "2"]
    assert [e["step"] for e in events] == list(range(1, 7)) and all(e["steps"] == 6 for e in events), events
    seen = page.evaluate("() => window.__idfChart")
    assert 1 in seen and max(seen) == 6, f"the chart did not grow step by step while training: {seen}"
    final = next(e["output"]["idfusion_loss"] for e in state["executed"] if str(e["node"]) == "2")
    chart = page.evaluate("() => ({ points: app.graph.getNodeById(2).properties.idfusion_loss,"
                          " data: { ...app.graph.getNodeById(2).__idfusionChart.root.dataset } })")
    assert chart["points"] == final and len(final) == 6, (chart, final)
    assert chart["data"]["lastStep"] == "6" and float(chart["data"]["lastLoss"]) == pytest.approx(final[-1][1])
    ui_browser.fit_node(page, 2, 0.8)
    box = page.locator(".idfusion-loss-chart canvas").first.bounding_box()
    px = ui_browser.region_pixels(page, (box["x"], box["y"], box["width"], box["height"]))
    assert _near(px, (0x4f, 0xc3, 0xf7), 60).sum() > 20, "no loss line drawn in the chart"
    screens(page, "feature_train_loss_chart")
    # kept after the run: saved with the workflow and drawn again when it is opened
    saved = ui_browser.serialize(page)
    page.evaluate("() => app.graph.clear()")
    ui_browser.load_ui(page, saved, "reopened")
    ui_browser.fit_node(page, 2, 1.0)
    again = page.evaluate("() => app.graph.getNodeById(2).__idfusionChart.root.dataset.points")
    assert again == "6", again
    prompt = ui_browser.graph_to_prompt(page)
    assert "idfusion_loss" not in json.dumps(prompt), "the chart's points must never reach the prompt"
