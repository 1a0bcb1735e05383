"""Face tooling on real data (scikit-image's astronaut photo, OpenCV's shipped Haar cascade) and on tiny ONNX
models built by tests/face_models.py with the signatures insightface routes. Nothing is downloaded."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import face_models as fm
from conftest import COMFYUI, ROOT
from idfusion_pack.idfusion import faces as F
from idfusion_pack.idfusion import metrics
from idfusion_pack.nodes import apply_nodes, eval_nodes, face_nodes, repaint_nodes

ASTRO_FACE = (177, 67, 270, 160)  # the astronaut's face (x1, y1, x2, y2), as OpenCV's Haar cascade finds it
FACE_NODES = [face_nodes.IDFusionFaceAnalysisLoader, face_nodes.IDFusionFaceCrop, face_nodes.IDFusionFaceMasks,
              repaint_nodes.IDFusionFaceCropForRepaint, repaint_nodes.IDFusionFaceStitch, eval_nodes.IDFusionFaceEvaluate]


def as_image(rgb):
    return torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def two_people(astronaut):
    """Two faces side by side: the astronaut and her mirror image (1024 x 512)."""
    return np.ascontiguousarray(np.concatenate([astronaut, astronaut[:, ::-1]], 1))


@pytest.fixture(scope="module")
def haar():
    return F.load_haar()


@pytest.fixture
def face_root(tmp_path, monkeypatch):
    """An empty models/insightface registered through folder_paths, like a user's folder."""
    import folder_paths
    root = tmp_path / "insightface"
    (root / "models").mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(root)], set()))
    return root


def make_pack(root, name="testpack", faces=((*ASTRO_FACE, 0.9),), size=(512, 512), det=True, rec=True):
    d = root / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    if det:
        fm.make_detector(d / "det_test.onnx", list(faces), size)
    if rec:
        fm.make_recognizer(d / "rec_test.onnx")
    return d


# ---------------------------------------------------------------------------------------------- registry, style

def test_face_nodes_registered_with_tooltips_and_category():
    import idfusion_pack
    for cls in FACE_NODES:
        node_id = next(k for k, v in idfusion_pack.NODE_CLASS_MAPPINGS.items() if v is cls)
        assert node_id.startswith("IDFusion") and node_id in idfusion_pack.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY == "IDFusion"
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (_, opts) in group.items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_pack_loads_without_insightface_onnxruntime_or_cv2():
    """A missing face stack must not stop the pack from loading; only the face nodes complain, clearly."""
    code = f"""
import sys
for m in ("insightface", "onnxruntime", "cv2"):
    sys.modules[m] = None  # makes `import m` fail, as when the package is not installed
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import conftest, idfusion_pack
from idfusion_pack.nodes import face_nodes
assert "IDFusionFaceCrop" in idfusion_pack.NODE_CLASS_MAPPINGS and "IDFusionApply" in idfusion_pack.NODE_CLASS_MAPPINGS
for call in (lambda: face_nodes.IDFusionFaceAnalysisLoader().load("{F.HAAR}", "CPU", 640, 0.5),
             lambda: face_nodes.IDFusionFaceAnalysisLoader().load("antelopev2", "CPU", 640, 0.5)):
    try:
        call()
    except ValueError as e:
        print("ERR", e)
"""
    env = dict(os.environ, COMFYUI_PATH=COMFYUI)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = [l for l in r.stdout.splitlines() if l.startswith("ERR")]
    assert len(errs) == 2, r.stdout
    assert "'cv2'" in errs[0] and "requirements.txt" in errs[0]
    # antelopev2 is absent from the default folder in this host, or onnxruntime is missing: either way it says what to do
    assert ("not found" in errs[1] and "Nothing is downloaded" in errs[1]) or "'onnxruntime'" in errs[1], errs[1]


# ---------------------------------------------------------------------------------------------- Haar fallback

def test_haar_finds_the_astronaut_face_without_identity(haar, astronaut):
    faces = haar.detect(astronaut)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].bbox
    assert abs(x1 - ASTRO_FACE[0]) < 12 and abs(y1 - ASTRO_FACE[1]) < 12 and abs(x2 - ASTRO_FACE[2]) < 12
    assert faces[0].kps is None and not haar.has_identity
    with pytest.raises(F.FaceToolError, match="no identity embedding.*Haar"):
        haar.embed(astronaut, faces[0])


def test_crop_node_on_astronaut(haar, astronaut):
    crops, bbox, preview, mask = face_nodes.IDFusionFaceCrop().crop(haar, as_image(astronaut), "largest", 0, 256, 0.5, "error")
    assert crops.shape == (1, 256, 256, 3) and preview.shape == (1, 512, 512, 3) and mask.shape == (1, 512, 512)
    (x1, y1, x2, y2), = bbox
    assert abs(x1 - ASTRO_FACE[0]) < 12 and abs(y2 - ASTRO_FACE[3]) < 12
    assert mask[0, int(y1) + 2, int(x1) + 2] == 1 and mask[0].sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.05)
    # the crop is the face box's square grown by margin: its centre pixel is the face centre
    c = astronaut[int((y1 + y2) / 2), int((x1 + x2) / 2)] / 255.0
    assert np.abs(crops[0, 128, 128].numpy() - c).max() < 0.08
    changed = (preview[0] != as_image(astronaut)[0]).any(-1)
    assert changed[int(y1), int(x1) + 10] and not changed[400, 400]  # outline drawn on the chosen face only


def test_crop_order_and_index(haar, two_people):
    node = face_nodes.IDFusionFaceCrop()
    img = as_image(two_people)
    _, (left,), _, _ = node.crop(haar, img, "left to right", 0, 64, 0.2, "error")
    _, (right,), _, _ = node.crop(haar, img, "left to right", 1, 64, 0.2, "error")
    assert left[0] < 512 and right[0] > 700  # the mirrored face, not a stray texture hit (weight filter)
    with pytest.raises(ValueError, match=r"image 0 of the batch has \d face\(s\), so there is no face at index 9"):
        node.crop(haar, img, "largest", 9, 64, 0.2, "error")


def test_no_face_policies(haar, astronaut):
    from comfy_execution.graph_utils import ExecutionBlocker
    node = face_nodes.IDFusionFaceCrop()
    blank = torch.full((1, 200, 300, 3), 0.5)
    with pytest.raises(ValueError, match="no face at index 0.*'whole image' or 'skip'"):
        node.crop(haar, blank, "largest", 0, 64, 0.2, "error")
    crops, bbox, _, mask = node.crop(haar, blank, "largest", 0, 64, 0.2, "whole image")
    assert crops.shape == (1, 64, 64, 3) and bbox == [None] and float(mask.sum()) == 0
    crops, bbox, preview, _ = node.crop(haar, blank, "largest", 0, 64, 0.2, "skip")
    assert isinstance(crops, ExecutionBlocker) and bbox == [None] and preview.shape == (1, 200, 300, 3)
    # skip in a batch: only images with a face are in crops, bbox keeps one entry per input image
    batch = torch.cat([as_image(astronaut), torch.full((1, 512, 512, 3), 0.5)])
    crops, bbox, _, mask = node.crop(haar, batch, "largest", 0, 64, 0.2, "skip")
    assert crops.shape == (1, 64, 64, 3) and bbox[0] is not None and bbox[1] is None and mask.shape == (2, 512, 512)


# ---------------------------------------------------------------------------------------------- identity masks

def test_face_masks_feed_multi_identity(haar, two_people):
    masks, preview = face_nodes.IDFusionFaceMasks().masks(as_image(two_people), 2, "left to right", 0.3, 8)
    assert masks.shape == (2, 512, 1024) and preview.shape == (1, 512, 1024, 3)
    ys, xs = np.nonzero(masks[0].numpy() == 1)
    assert xs.max() < 512 and ys.min() < ASTRO_FACE[1] < ys.max()  # identity 1 = the left face
    assert np.nonzero(masks[1].numpy() == 1)[1].min() >= 512
    soft = masks[0].numpy()
    assert ((soft > 0) & (soft < 1)).any() and soft.max() == 1  # feathered edge around a hard core
    for n, m in enumerate(masks):  # what Apply Multi-Identity checks on its masks input
        apply_nodes._region(m, f"mask {n + 1}")
    # each identity tinted in its own colour
    p = (preview[0].numpy() * 255).round()
    cy = (ASTRO_FACE[1] + ASTRO_FACE[3]) // 2
    assert p[cy, (ASTRO_FACE[0] + ASTRO_FACE[2]) // 2][0] > p[cy, 1024 - (ASTRO_FACE[0] + ASTRO_FACE[2]) // 2][0]


def test_face_masks_errors_and_user_masks(two_people):
    node = face_nodes.IDFusionFaceMasks()
    with pytest.raises(ValueError, match="Found 2 face\\(s\\) in image but identities is 3"):
        node.masks(as_image(two_people), 3, "left to right", 0.3, 8)
    user = torch.zeros(2, 64, 128)
    user[0, :, :64] = 1
    user[1, :, 64:] = 1
    masks, _ = node.masks(as_image(two_people), 2, "left to right", 0.0, 0, user_masks=user)
    assert masks.shape == (2, 512, 1024) and masks[0, :, :500].min() == 1 and masks[0, :, 524:].max() == 0
    with pytest.raises(ValueError, match="user_masks has 2 mask\\(s\\) but identities is 3"):
        node.masks(as_image(two_people), 3, "left to right", 0.0, 0, user_masks=user)


# ---------------------------------------------------------------------------------------------- insightface packs

def test_loader_routes_test_models_and_aligns(face_root, astronaut):
    make_pack(face_root, faces=[(*ASTRO_FACE, 0.9), (20, 300, 120, 420, 0.7)])
    fm.make_unrecognised(face_root / "models" / "testpack" / "zz_other.onnx")  # ignored, not an error
    assert "testpack" in face_nodes.IDFusionFaceAnalysisLoader.INPUT_TYPES()["required"]["model"][0]
    fa, = face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CPU", 640, 0.5)
    assert fa.kind == "insightface" and fa.has_identity and fa.detector.taskname == "detection"
    assert fa.recognizer.taskname == "recognition"
    assert fa.detector.session.get_providers() == ["CPUExecutionProvider"]
    faces = fa.detect(astronaut)
    assert [round(f.score, 2) for f in F.order_faces(faces, "most confident")] == [0.9, 0.7]
    assert F.pick(faces, "largest", 0).bbox[0] == pytest.approx(20, abs=0.5)
    assert F.pick(faces, "most confident", 0).bbox == pytest.approx(ASTRO_FACE, abs=0.5)
    # alignment maps the landmarks onto the ArcFace template (margin 0, 112 px)
    f = F.pick(faces, "most confident", 0)
    m = F.crop_matrix(f, 112, 0.0)
    assert (m[:, :2] @ f.kps.T + m[:, 2:]).T == pytest.approx(F.ARCFACE_112, abs=0.05)
    e = fa.embed(astronaut, f)
    assert e.shape == (32,) and metrics.cosine(e, fa.embed(astronaut, f)) == pytest.approx(1.0)
    # det_thresh drops the weaker face
    fa2, = face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CPU", 0, 0.8)
    assert len(fa2.detect(astronaut)) == 1


def test_missing_pack_says_which_files_go_where(face_root):
    with pytest.raises(ValueError) as e:
        face_nodes.IDFusionFaceAnalysisLoader().load("antelopev2", "CPU", 640, 0.5)
    msg = str(e.value)
    assert "Nothing is downloaded" in msg and str(face_root / "models" / "antelopev2") in msg
    for f in F.KNOWN_PACKS["antelopev2"]:
        assert f in msg
    # the classic mistake: the zip extracted into antelopev2/antelopev2/
    make_pack(face_root, name="antelopev2/antelopev2")
    with pytest.raises(ValueError, match="one folder too deep"):
        face_nodes.IDFusionFaceAnalysisLoader().load("antelopev2", "CPU", 640, 0.5)


def test_provider_errors(face_root):
    make_pack(face_root)
    with pytest.raises(ValueError, match="provider 'CUDA' .*not available.*onnxruntime-gpu"):
        face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CUDA", 640, 0.5)
    with pytest.raises(ValueError, match="DirectML.*onnxruntime-directml"):
        face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "DirectML", 640, 0.5)
    with pytest.raises(F.FaceToolError, match="provider must be one of"):
        F.resolve_providers("TPU")
    assert F.resolve_providers("CPU") == ["CPUExecutionProvider"]


def test_damaged_model_file_is_named(face_root):
    d = make_pack(face_root)
    (d / "broken.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="broken.onnx.*damaged or not an insightface model"):
        face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CPU", 640, 0.5)


def test_pack_without_detector_or_recognizer(face_root, astronaut):
    make_pack(face_root, name="recognition_only", det=False)
    with pytest.raises(ValueError, match="has no face detection model"):
        face_nodes.IDFusionFaceAnalysisLoader().load("recognition_only", "CPU", 640, 0.5)
    make_pack(face_root, name="detection_only", rec=False)
    fa, = face_nodes.IDFusionFaceAnalysisLoader().load("detection_only", "CPU", 640, 0.5)
    assert not fa.has_identity and len(fa.detect(astronaut)) == 1
    # Face Evaluate still finds the face and measures SSIM/PSNR; identity is NaN (issue 21; more in test_metrics.py)
    sim, _, ssim, _, found, report = eval_nodes.IDFusionFaceEvaluate().evaluate(fa, as_image(astronaut), as_image(astronaut), 128, 0.0)["result"]
    assert found and np.isnan(sim) and ssim == pytest.approx(1.0) and "no identity model" in report, report


def test_insightface_missing_is_reported(face_root, monkeypatch):
    make_pack(face_root)
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(ValueError, match="needs the Python package 'insightface'.*requirements.txt"):
        face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CPU", 640, 0.5)


# ---------------------------------------------------------------------------------------------- metrics, evaluation

def test_ssim_psnr_match_scikit_image(astronaut):
    rng = np.random.default_rng(0)
    a = astronaut[60:188, 160:288].astype(np.float64) / 255
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ref = structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert metrics.ssim(a, b) == pytest.approx(ref, abs=1e-9)
    assert metrics.ssim(a[..., 0], b[..., 0]) == pytest.approx(
        structural_similarity(a[..., 0], b[..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False), abs=1e-9)
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    assert metrics.ssim(a, a) == pytest.approx(1.0) and metrics.psnr(a, a) == float("inf")
    assert metrics.cosine([1, 0], [0, 2]) == pytest.approx(0.0) and metrics.cosine([1, 1], [2, 2]) == pytest.approx(1.0)


def test_evaluate_node(face_root, astronaut):
    make_pack(face_root)
    fa, = face_nodes.IDFusionFaceAnalysisLoader().load("testpack", "CPU", 640, 0.5)
    rng = np.random.default_rng(1)
    noisy = np.clip(astronaut + rng.normal(0, 8, astronaut.shape), 0, 255).round().astype(np.uint8)
    out = eval_nodes.IDFusionFaceEvaluate().evaluate(fa, torch.cat([as_image(noisy), as_image(astronaut)]), as_image(astronaut), 128, 0.0)
    sim, dist, ssim, psnr, found, report = out["result"]
    assert found and dist == pytest.approx(1 - sim) and 0.5 < sim < 1.0
    face = fa.detect(astronaut)[0]
    m = F.crop_matrix(face, 128, 0.0)
    a, b = (F.warp(x, m, 128) / 255.0 for x in (noisy, astronaut))
    # image 1 equals the reference: SSIM 1; the mean over the batch is reported
    assert ssim == pytest.approx((structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                        sigma=1.5, use_sample_covariance=False) + 1) / 2, abs=1e-6)
    assert psnr == float("inf") and "image 1: similarity 1.0000" in report
    # per image for scripts/face_benchmark.py, valid JSON for the UI (no Infinity literal)
    scores = json.loads(json.dumps(out["ui"]["idfusion_scores"], allow_nan=False))
    assert [s["found"] for s in scores] == [True, True] and scores[1]["psnr"] == "inf" and scores[1]["ssim"] == pytest.approx(1.0)
    assert (scores[0]["similarity"] + scores[1]["similarity"]) / 2 == pytest.approx(sim)
    assert scores[0]["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))
    # a generated image without a face scores as a miss
    blank = torch.full((1, 512, 512, 3), 0.5)
    fa_blank = F.FaceAnalyzer("x", "insightface", fa.detector, fa.recognizer)
    fa_blank.detect = lambda rgb: [] if rgb.std() == 0 else F.FaceAnalyzer.detect(fa, rgb)
    sim, dist, ssim, psnr, found, report = eval_nodes.IDFusionFaceEvaluate().evaluate(fa_blank, blank, as_image(astronaut), 64, 0.0)["result"]
    assert (sim, dist, ssim, psnr, found) == (0.0, 1.0, 0.0, 0.0, False) and report == "image 0: no face"


# ---------------------------------------------------------------------------------------------- repaint

def test_repaint_stitch_is_exact_outside_the_feathered_band(haar, astronaut):
    img = as_image(astronaut)
    crop, mask, handle = repaint_nodes.IDFusionFaceCropForRepaint().crop(haar, img, "largest", 0, 2.0, 256, 0.1, 16, "error")
    assert crop.shape == (1, 256, 256, 3) and mask.shape == (1, 256, 256)
    x1, y1, x2, y2 = handle.box
    assert x2 - x1 == y2 - y1 and 0 <= x1 and x2 <= 512 and 0 <= y1 and y2 <= 512
    repainted = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    out, = repaint_nodes.IDFusionFaceStitch().stitch(handle, repainted)
    assert out.shape == img.shape
    band = torch.zeros(512, 512, dtype=torch.bool)
    band[y1:y2, x1:x2] = handle.blend > 0
    assert torch.equal(out[0][~band], img[0][~band])          # bit-exact everywhere the blend mask is 0
    assert (out[0][band] != img[0][band]).any(-1).float().mean() > 0.9
    core = torch.zeros(512, 512, dtype=torch.bool)
    core[y1:y2, x1:x2] = handle.blend == 1
    new = repaint_nodes._resize(repainted, y2 - y1, x2 - x1)[0]
    assert torch.allclose(out[0, y1:y2, x1:x2][handle.blend == 1], new[handle.blend == 1])
    feather = (handle.blend > 0) & (handle.blend < 1)
    assert feather.any() and core.sum() < band.sum()
    # the crop shows the context box, the mask marks the face in it
    assert mask[0, 128, 128] == 1 and mask[0, 2, 2] == 0


def test_repaint_skip_returns_the_image_unchanged(haar):
    blank = torch.full((1, 100, 120, 3), 0.25)
    node = repaint_nodes.IDFusionFaceCropForRepaint()
    with pytest.raises(ValueError, match="none at index 0"):
        node.crop(haar, blank, "largest", 0, 2.0, 64, 0.1, 8, "error")
    crop, mask, handle = node.crop(haar, blank, "largest", 0, 2.0, 64, 0.1, 8, repaint_nodes.SKIP)
    assert crop.shape == (1, 64, 64, 3) and float(mask.sum()) == 0
    out, = repaint_nodes.IDFusionFaceStitch().stitch(handle, torch.rand(1, 64, 64, 3))
    assert torch.equal(out, blank)


def test_repaint_workflow_uses_known_nodes_and_inputs():
    import idfusion_pack
    import nodes as comfy_nodes
    comfy = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    comfy.update(idfusion_pack.NODE_CLASS_MAPPINGS)
    path = os.path.join(ROOT, "workflows", "api", "idfusion_face_repaint_api.json")
    with open(path) as f:
        wf = json.load(f)
    types = {n["class_type"] for n in wf.values()}
    assert {"IDFusionFaceCropForRepaint", "IDFusionFaceStitch", "SetLatentNoiseMask", "IDFusionApply", "KSampler"} <= types
    for nid, n in wf.items():
        spec = comfy[n["class_type"]].INPUT_TYPES()
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(n["inputs"]) <= set(known), (nid, set(n["inputs"]) - set(known))
        assert set(spec.get("required", {})) <= set(n["inputs"]), (nid, set(spec["required"]) - set(n["inputs"]))
        for v in n["inputs"].values():
            if isinstance(v, list):
                assert v[0] in wf, (nid, v)
