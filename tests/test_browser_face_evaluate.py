"""Face Evaluate's badge in the REAL frontend (headless chromium, one ComfyUI server for the module): with a
ground-truth photo it shows Sim(GT) and copy-paste beside the similarity and previews the fidelity-against-copy-paste
chart; with the Haar option (no ArcFace) it says identity was not measured and shows SSIM/PSNR (issue 21). The page
only presents what the node sent in `idfusion_scores`."""
import os

import numpy as np
import pytest
from PIL import Image

import ui_browser  # scripts/ is on sys.path (conftest.py)
from conftest import running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import face_models as fm
    from skimage import data
    base = str(tmp_path_factory.mktemp("comfy_base_face_evaluate"))
    ui_browser.seed_user_settings(base)
    pack = os.path.join(base, "models", "insightface", "models", "antelopev2")  # tiny ONNX stand-ins (tests/face_models.py)
    os.makedirs(pack)
    fm.make_detector(os.path.join(pack, "det_test.onnx"), [(177, 67, 270, 160, 0.9)], (512, 512))
    fm.make_recognizer(os.path.join(pack, "rec_test.onnx"))
    os.makedirs(os.path.join(base, "input"))
    astro = data.astronaut()
    Image.fromarray(astro).save(os.path.join(base, "input", "astronaut.png"))
    noisy = np.clip(astro + np.random.default_rng(0).normal(0, 8, astro.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(os.path.join(base, "input", "generated.png"))
    with running_server(base) as srv:
        yield srv


def badge(page, node_id):
    return page.evaluate("(id) => { const n = app.graph.getNodeById(id);"
                         " const el = n.widgets.find((w) => w.element?.classList.contains('idfusion-score-badge'))?.element;"
                         " return el ? { text: el.innerText, data: { ...el.dataset },"
                         " clipped: el.scrollHeight > el.clientHeight + 1,"
                         " dims: [el.scrollWidth, el.clientWidth, el.scrollHeight, el.clientHeight],"
                         " fits: n.size[1] >= n.computeSize()[1] - 1,"
                         " shown: el.getBoundingClientRect().height > 0 } : null; }", node_id)


def graph(model, ground_truth):
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}, "_meta": {"title": "reference"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "generated.png"}, "_meta": {"title": "generated"}},
        "3": {"class_type": "IDFusionFaceAnalysisLoader", "inputs": {"model": model, "provider": "CPU", "det_size": 640,
              "det_thresh": 0.5}, "_meta": {"title": "face analysis"}},
        "4": {"class_type": "IDFusionFaceEvaluate", "inputs": {"face_analysis": ["3", 0], "image": ["2", 0], "reference": ["1", 0],
              "size": 64, "margin": 0.0}, "_meta": {"title": "IDFusion Face Evaluate"}},
    }
    if ground_truth:
        g["5"] = {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "y-axis: horizontally"},
                  "_meta": {"title": "ground truth: another picture of her"}}
        g["4"]["inputs"]["ground_truth"] = ["5", 0]
    return g


def run(page, model, ground_truth, name):
    ui_browser.clear_toasts(page)
    ui_browser.load_api(page, graph(model, ground_truth), name)
    state = ui_browser.queue(page, timeout_s=300)
    out = next(e["output"] for e in state["executed"] if str(e["node"]) == "4")
    page.wait_for_timeout(200)
    ui_browser.fit_node(page, 4, 1.5)
    return out, badge(page, 4)


def test_badge_shows_copy_paste_and_the_chart_preview(page, screens):
    out, b = run(page, "antelopev2", True, "face_evaluate_copy_paste")
    s = out["idfusion_scores"][0]
    assert isinstance(s["sim_gt"], float) and isinstance(s["copy_paste"], float), s
    assert f"similarity {s['similarity']:.3f}" in b["text"], b
    assert f"Sim(GT) {s['sim_gt']:.3f}" in b["text"] and f"copy-paste {s['copy_paste']:.3f}" in b["text"], b
    assert float(b["data"]["copyPaste"]) == pytest.approx(s["copy_paste"]) and b["shown"] and not b["clipped"], b
    # the chart the node saved is the node's image preview
    assert len(out["images"]) == 1 and out["images"][0]["type"] == "temp", out
    name = out["images"][0]["filename"]
    page.wait_for_function("(name) => [...document.querySelectorAll('img')].some((i) => i.src.includes(name) && i.complete"
                           " && i.naturalWidth > 0) || (app.graph.getNodeById(4).imgs || []).some((i) => i.src.includes(name)"
                           " && i.naturalWidth > 0)", arg=name, timeout=20000)
    page.wait_for_timeout(300)
    ui_browser.fit_node(page, 4, 1.0)
    b = badge(page, 4)   # the node grew for the chart preview, so the badge keeps its two lines
    assert b["fits"] and b["shown"] and not b["clipped"], b
    screens(page, "feature_face_evaluate_copy_paste")


def test_haar_option_measures_without_identity(page, screens):
    out, b = run(page, "opencv haar (no identity)", False, "face_evaluate_haar")
    s = out["idfusion_scores"][0]
    assert s["found"] is True and s["similarity"] == "nan" and isinstance(s["ssim"], float), s
    assert "face found" in b["text"] and f"no identity model: ssim {s['ssim']:.3f}" in b["text"], b
    assert "similarity" not in b["text"] and b["shown"] and not b["clipped"], b
    screens(page, "feature_face_evaluate_haar")
