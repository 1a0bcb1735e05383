"""IDFusion Face Pose: InstantID-format 5-point keypoint images and dense landmark images, from a face analysis built
on tiny ONNX models (tests/face_models.py's detector, plus 106- and 68-point landmark models built here with the
signatures insightface routes: 192x192 input, 212 or 3309 outputs). Nothing is downloaded. Node calls run under
torch.inference_mode(), as ComfyUI runs them."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import face_models as fm
from idfusion_pack.idfusion import faces as F
from idfusion_pack.idfusion import pose as P
from idfusion_pack.nodes import face_nodes, pose_nodes

SIZE = 512
FACES = [(60, 120, 240, 300, 0.9), (300, 100, 460, 260, 0.8)]  # left (larger) and right face, x1 y1 x2 y2 score
RING_106, RING_68 = 0.5, 0.3  # where the test landmark models put their points, in the crop's [-1, 1] coordinates


def make_landmarker(path, points, outputs):
    """A landmark model that ignores its input and returns `points` (N, 2 or 3) in insightface's normalised crop
    coordinates, laid out as 2d106det (212 outputs) or 1k3d68 (3309 outputs, the last 68 triples are used)."""
    flat = np.zeros(outputs, np.float32)
    flat[-points.size:] = points.astype(np.float32).ravel()
    nodes = [helper.make_node("ReduceMean", ["data"], ["m"], keepdims=0, name="lm_mean"),
             helper.make_node("Mul", ["m", "zero"], ["nil"], name="lm_zero"),
             helper.make_node("Add", ["pts", "nil"], ["fc1"], name="lm_out")]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"), numpy_helper.from_array(flat[None], "pts")]
    graph = helper.make_graph(nodes, "landmark_test", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, outputs])], inits)
    fm._save(graph, path)


def ring(n, radius, dim=2):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([radius * np.cos(a), radius * np.sin(a)] + ([np.zeros(n)] if dim == 3 else []), 1)
    return pts


def expected_ring(bbox, n, radius):
    """Where insightface maps ring points of a face box: the crop is centred on the box, 1.5x its longer side wide."""
    x1, y1, x2, y2 = bbox
    half = max(x2 - x1, y2 - y1) * 1.5 / 2
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2]) + ring(n, radius) * half


@pytest.fixture
def face_root(tmp_path, monkeypatch):
    import folder_paths
    root = tmp_path / "insightface"
    (root / "models").mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(root)], set()))
    return root


def pack(root, name, with106=True, with68=True):
    d = root / "models" / name
    d.mkdir(parents=True)
    fm.make_detector(d / "det_test.onnx", FACES, (SIZE, SIZE))
    if with106:
        make_landmarker(d / "2d106det.onnx", ring(106, RING_106), 212)
    if with68:
        make_landmarker(d / "1k3d68.onnx", ring(68, RING_68, dim=3), 3309)
    fa, = face_nodes.IDFusionFaceAnalysisLoader().load(name, "CPU", 640, 0.5)
    return fa


def draw(fa, image=None, faces="one face", order="largest", index=0, landmarks="106 points", no_face="error"):
    image = torch.full((1, SIZE, SIZE, 3), 0.5) if image is None else image
    with torch.inference_mode():
        kps, lmk = pose_nodes.IDFusionFacePose().draw(fa, image, faces, order, index, landmarks, no_face)
    return (kps[0].numpy() * 255).round().astype(int), (lmk[0].numpy() * 255).round().astype(int)


def test_keypoint_image_is_instantid_format(face_root):
    fa = pack(face_root, "kpack")
    face = F.pick(fa.detect(np.zeros((SIZE, SIZE, 3), np.uint8)), "largest", 0)
    kps_img, _ = draw(fa)
    assert kps_img.shape == (SIZE, SIZE, 3)
    for i, (x, y) in enumerate(face.kps):  # each point a full-colour disc of radius 10
        assert tuple(kps_img[int(y), int(x)]) == P.KPS_COLORS[i]
        assert tuple(kps_img[int(y), int(x) + 8]) == P.KPS_COLORS[i]
    for a, b in P.KPS_LIMBS:                # each limb in its first point's colour at 60%
        mid = (face.kps[a] + face.kps[b]) / 2
        assert tuple(kps_img[int(round(mid[1])), int(round(mid[0]))]) == tuple(int(c * 0.6) for c in P.KPS_COLORS[a])
    assert kps_img[:100].max() == 0 and kps_img[:, 260:].max() == 0  # black background; the other face not drawn
    both, _ = draw(fa, faces="all faces")
    assert both[:, 260:].max() > 0 and np.array_equal(both[:, :260], kps_img[:, :260])
    right, _ = draw(fa, order="left to right", index=1)
    assert right[:, :260].max() == 0 and right[:, 260:].max() > 0


def test_landmark_image_from_the_packs_106_or_68_point_model(face_root):
    fa = pack(face_root, "lpack")
    face = F.pick(fa.detect(np.zeros((SIZE, SIZE, 3), np.uint8)), "largest", 0)
    for choice, n, radius in (("106 points", 106, RING_106), ("68 points", 68, RING_68)):
        _, lmk = draw(fa, landmarks=choice)
        pts = expected_ring(face.bbox, n, radius)
        on = [lmk[int(round(y)), int(round(x))].min() for x, y in pts]
        assert min(on) == 255, f"{choice}: a landmark is not drawn where insightface puts it"
        cx, cy = (face.bbox[:2] + face.bbox[2:]) / 2
        assert lmk[int(cy), int(cx)].max() == 0 and lmk[:60].max() == 0
        # the other ring (the other model) is not drawn
        other = expected_ring(face.bbox, 8, RING_68 if n == 106 else RING_106)
        assert max(lmk[int(round(y)), int(round(x))].max() for x, y in other) == 0


def test_pack_without_one_or_both_landmark_models(face_root, caplog):
    only68 = pack(face_root, "p68", with106=False)
    _, lmk = draw(only68, landmarks="106 points")  # falls back to the model the pack has
    face = F.pick(only68.detect(np.zeros((SIZE, SIZE, 3), np.uint8)), "largest", 0)
    x, y = expected_ring(face.bbox, 68, RING_68)[0]
    assert lmk[int(round(y)), int(round(x))].min() == 255
    bare = pack(face_root, "bare", with106=False, with68=False)
    kps, lmk = draw(bare)
    assert kps.max() > 0 and lmk.max() == 0
    assert "no 106- or 68-point landmark model" in caplog.text


def test_no_face_and_no_keypoints_say_what_to_do(face_root):
    fa = pack(face_root, "npack")
    with pytest.raises(ValueError, match=r"image 0 of the batch has 2 face\(s\), none at index 5.*set no_face to 'black image'"):
        draw(fa, index=5)
    kps, lmk = draw(fa, index=5, no_face="black image")
    assert kps.max() == 0 and lmk.max() == 0
    with torch.inference_mode(), pytest.raises(ValueError, match="Haar fallback finds faces but gives no keypoints.*insightface pack"):
        pose_nodes.IDFusionFacePose().draw(F.load_haar(), torch.zeros(1, 64, 64, 3), "one face", "largest", 0, "106 points", "error")


def test_batch_gives_one_pose_image_per_input_of_its_size(face_root):
    fa = pack(face_root, "bpack")
    images = torch.full((2, SIZE, SIZE, 3), 0.5)
    with torch.inference_mode():
        kps, lmk = pose_nodes.IDFusionFacePose().draw(fa, images, "all faces", "largest", 0, "106 points", "error")
    assert kps.shape == (2, SIZE, SIZE, 3) and lmk.shape == (2, SIZE, SIZE, 3) and kps.dtype == torch.float32


def test_pose_node_registered_with_tooltips_and_category():
    import idfusion_pack
    assert idfusion_pack.NODE_CLASS_MAPPINGS["IDFusionFacePose"] is pose_nodes.IDFusionFacePose
    assert "IDFusionFacePose" in idfusion_pack.NODE_DISPLAY_NAME_MAPPINGS
    assert pose_nodes.IDFusionFacePose.CATEGORY == "IDFusion"
    for name, (_, opts) in pose_nodes.IDFusionFacePose.INPUT_TYPES()["required"].items():
        assert opts.get("tooltip"), name
