"""Pose images for keypoint/pose ControlNets, from a face analysis: InstantID's 5-point keypoint image and a dense
landmark image (insightface's 106-point 2D or 68-point 3D landmark models, when the pack has them).

The paper notes that IDFusion alone cannot control head pose; these images let a keypoints ControlNet
(InstantID's, or any trained on the same drawing) fix it, as Dense-Face and FaceSnap do with their pose inputs.
Images are numpy uint8 RGB (H, W, 3); the node layer converts from and to ComfyUI tensors.
"""
from __future__ import annotations

import glob
import logging
import math
import os

import numpy as np

from .faces import FaceToolError, cv2, resolve_providers

log = logging.getLogger("IDFusion")

# InstantID's keypoint drawing: eyes, nose, mouth corners in these RGB colours; a "limb" from each of the other four
# points to the nose, drawn as a filled ellipse 4 px wide at 60% intensity, then each point as a 10 px disc.
KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
KPS_LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]
KPS_STICK_WIDTH = 4
KPS_RADIUS = 10
KPS_LIMB_INTENSITY = 0.6

# The usual 68-point contour groups (jaw, brows, nose bridge, nostrils, eyes, outer and inner lips); True = closed.
LANDMARK_68_GROUPS = [(range(0, 17), False), (range(17, 22), False), (range(22, 27), False), (range(27, 31), False),
                      (range(31, 36), False), (range(36, 42), True), (range(42, 48), True), (range(48, 60), True),
                      (range(60, 68), True)]


def draw_kps(h: int, w: int, faces_kps: list[np.ndarray]) -> np.ndarray:
    """InstantID-format keypoint image (h, w, 3) uint8 on black: limbs first (scaled to 60%), then points on top."""
    c = cv2()
    limbs = np.zeros((h, w, 3), np.uint8)
    for kps in faces_kps:
        for a, b in KPS_LIMBS:
            (xa, ya), (xb, yb) = kps[a], kps[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            poly = c.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), KPS_STICK_WIDTH), int(angle), 0, 360, 1)
            c.fillConvexPoly(limbs, poly, KPS_COLORS[a])
    out = np.ascontiguousarray((limbs.astype(np.float32) * KPS_LIMB_INTENSITY).astype(np.uint8))
    for kps in faces_kps:
        for i, (x, y) in enumerate(kps):
            c.circle(out, (int(x), int(y)), KPS_RADIUS, KPS_COLORS[i], -1)
    return out


def draw_landmarks(h: int, w: int, faces_landmarks: list[np.ndarray]) -> np.ndarray:
    """Dense landmarks (N, 2 or 3) as white points on black (68-point sets also get their contour lines), point size
    scaled with the image."""
    c = cv2()
    out = np.zeros((h, w, 3), np.uint8)
    r = max(1, round(max(h, w) / 256))
    for pts in faces_landmarks:
        xy = np.round(np.asarray(pts)[:, :2]).astype(np.int32)
        if len(xy) == 68:
            for group, closed in LANDMARK_68_GROUPS:
                c.polylines(out, [xy[list(group)].reshape(-1, 1, 2)], closed, (255, 255, 255), max(1, r // 2), c.LINE_AA)
        for x, y in xy:
            c.circle(out, (int(x), int(y)), r, (255, 255, 255), -1)
    return out


# ---- dense landmark models of an insightface pack ------------------------------------------------------------------
_LANDMARKERS: dict = {}  # (pack folder, provider) -> {taskname: model}, loaded once per pack


def landmarkers(analyzer) -> dict:
    """insightface's landmark models in the analyzer's pack folder ({'landmark_2d_106': m, 'landmark_3d_68': m}),
    routed by insightface itself; {} for the Haar fallback or a pack without them. Never downloads."""
    if getattr(analyzer, "kind", None) != "insightface" or not analyzer.path:
        return {}
    key = (analyzer.path, analyzer.provider)
    if key not in _LANDMARKERS:
        from insightface.model_zoo import model_zoo
        providers = resolve_providers(analyzer.provider)
        found = {}
        for f in sorted(glob.glob(os.path.join(analyzer.path, "*.onnx"))):
            try:
                m = model_zoo.get_model(f, providers=providers)
            except Exception as e:
                raise FaceToolError(f"Could not load '{f}' with onnxruntime ({type(e).__name__}: {e}). The file is damaged: "
                                    f"replace it from the pack's download.") from e
            if m is not None and str(getattr(m, "taskname", "")).startswith("landmark") and m.taskname not in found:
                m.prepare(0)
                found[m.taskname] = m
        _LANDMARKERS[key] = found
    return _LANDMARKERS[key]


def dense_landmarks(analyzer, rgb: np.ndarray, face, prefer: str = "106") -> np.ndarray | None:
    """(N, 2) landmarks of `face` from the pack's 106-point or 68-point model (`prefer` first), or None."""
    models = landmarkers(analyzer)
    order = ["landmark_2d_106", "landmark_3d_68"] if prefer == "106" else ["landmark_3d_68", "landmark_2d_106"]
    for task in order:
        if task in models:
            from insightface.app.common import Face as InsightFace
            target = InsightFace(bbox=np.asarray(face.bbox, np.float32))
            pts = models[task].get(np.ascontiguousarray(rgb[..., ::-1]), target)  # insightface works in BGR
            return np.asarray(pts, np.float64)[:, :2]
    return None
