"""Face tooling: loading insightface model packs (never downloading), an OpenCV Haar fallback detector, face
ordering, aligned crops, identity masks and crop/stitch for two-stage face repaint.

insightface, onnxruntime and cv2 are imported lazily, inside the functions that need them, so a missing or
broken install only affects the face nodes (with a message saying what to install), never the pack.
Images here are numpy uint8 RGB (H, W, 3) unless said otherwise; the node layer converts from ComfyUI tensors.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("IDFusion")

HAAR = "opencv haar (no identity)"
# The two packs users already have for IPAdapter/InstantID/PuLID; the files are what their zips contain.
KNOWN_PACKS = {
    "antelopev2": ["1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"],
    "buffalo_l": ["1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"],
}
PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "ROCm": "ROCMExecutionProvider",
             "CoreML": "CoreMLExecutionProvider", "DirectML": "DmlExecutionProvider"}
_PROVIDER_FIX = {"CUDA": "pip uninstall onnxruntime && pip install onnxruntime-gpu (one ONNX Runtime per environment)",
                 "ROCm": "install AMD's onnxruntime-rocm build in place of onnxruntime",
                 "CoreML": "use the standard onnxruntime wheel on macOS",
                 "DirectML": "pip uninstall onnxruntime && pip install onnxruntime-directml (Windows)"}
ORDERS = ("largest", "left to right", "most confident")
# ArcFace's 5-point template (eyes, nose, mouth corners) in a 112x112 crop, as insightface's norm_crop uses.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


class FaceToolError(RuntimeError):
    """A face-tool problem the user can fix (missing package, missing model files, bad choice)."""


@dataclass
class Face:
    bbox: np.ndarray                    # (4,) x1, y1, x2, y2 in pixels of the analysed image
    score: float                        # detector confidence (Haar: its level weight, not a probability)
    kps: np.ndarray | None = None       # (5, 2) eyes, nose, mouth corners; None from the Haar fallback
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0) * max(self.bbox[3] - self.bbox[1], 0))


def _import(name, what):
    try:
        return __import__(name)
    except Exception as e:  # ImportError, or a broken native library (OSError) inside it
        raise FaceToolError(f"{what} needs the Python package '{name}', which could not be imported ({type(e).__name__}: {e}). "
                            f"Install the pack's requirements: pip install -r ComfyUI/custom_nodes/ComfyUI-IDFusion/requirements.txt") from e


def cv2():
    return _import("cv2", "Face detection/alignment")


# ---------------------------------------------------------------------------------------------- model packs

def pack_dirs(name: str, roots: list[str]) -> list[str]:
    """Where pack `name` may live under each insightface root: <root>/models/<name> (the layout other packs use)
    and <root>/<name>."""
    return [d for r in roots for d in (os.path.join(r, "models", name), os.path.join(r, name))]


def available_packs(roots: list[str]) -> list[str]:
    """Known pack names first (listed even when missing, so the node can say what to put where), then any other
    folder that holds .onnx files."""
    found = []
    for r in roots:
        for base in (os.path.join(r, "models"), r):
            if os.path.isdir(base):
                found += [n for n in sorted(os.listdir(base)) if n != "models" and glob.glob(os.path.join(base, n, "*.onnx"))]
    return list(KNOWN_PACKS) + sorted(set(found) - set(KNOWN_PACKS))


def missing_pack_message(name: str, roots: list[str]) -> str:
    where = os.path.join(roots[0], "models", name) if roots else f"ComfyUI/models/insightface/models/{name}"
    files = KNOWN_PACKS.get(name)
    listing = ", ".join(files) if files else "its .onnx files (one detection model, e.g. SCRFD, and one ArcFace recognition model)"
    nested = [d for d in pack_dirs(name, roots) if glob.glob(os.path.join(d, name, "*.onnx"))]
    hint = (f" The files are one folder too deep in {nested[0]}/{name}: move them up into {nested[0]}." if nested else "")
    return (f"Face model pack '{name}' was not found. Nothing is downloaded automatically: put {listing} in {where}"
            f" (searched: {', '.join(pack_dirs(name, roots))}).{hint} Without models, choose '{HAAR}' for crops and masks "
            f"(no identity embedding).")


def find_pack(name: str, roots: list[str]) -> str:
    for d in pack_dirs(name, roots):
        if glob.glob(os.path.join(d, "*.onnx")):
            return d
    raise FaceToolError(missing_pack_message(name, roots))


def resolve_providers(provider: str) -> list[str]:
    ort = _import("onnxruntime", "The insightface face models")
    if provider not in PROVIDERS:
        raise FaceToolError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}.")
    wanted, have = PROVIDERS[provider], ort.get_available_providers()
    if wanted not in have:
        raise FaceToolError(f"provider '{provider}' ({wanted}) is not available in this onnxruntime "
                            f"(available: {', '.join(have)}). Pick CPU, or {_PROVIDER_FIX[provider]}.")
    # CPU stays as the fallback for operators the accelerator does not implement
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


class FaceAnalyzer:
    """The loaded face tools: a detector and, with insightface, an ArcFace recognizer. Detection and embedding
    take RGB uint8 images."""

    def __init__(self, name, kind, detector, recognizer=None, provider="CPU", det_thresh=0.5, path=None):
        self.name, self.kind, self.provider, self.det_thresh, self.path = name, kind, provider, det_thresh, path
        self.detector, self.recognizer = detector, recognizer

    @property
    def has_identity(self) -> bool:
        return self.recognizer is not None

    def __repr__(self):
        return f"FaceAnalyzer({self.name!r}, {self.kind}, identity={self.has_identity})"

    def detect(self, rgb: np.ndarray) -> list[Face]:
        if self.kind == "haar":
            return _haar_detect(self.detector, rgb, self.det_thresh)
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface works in OpenCV's BGR
        bboxes, kpss = self.detector.detect(bgr)
        out = []
        for i in range(bboxes.shape[0]):
            if bboxes[i, 4] < self.det_thresh:
                continue
            out.append(Face(bboxes[i, :4].astype(np.float64), float(bboxes[i, 4]),
                            None if kpss is None else kpss[i].astype(np.float64)))
        return out

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """ArcFace embedding of `face` (aligned from its 5 landmarks, as insightface does)."""
        if not self.has_identity:
            raise FaceToolError(f"The face model '{self.name}' gives no identity embedding: "
                                + ("the OpenCV Haar fallback only finds faces. " if self.kind == "haar" else "its pack has no ArcFace recognition model. ")
                                + "Load antelopev2 or buffalo_l (IDFusion Load Face Analysis) for identity similarity.")
        if face.kps is None:
            raise FaceToolError("This face has no landmarks, so it cannot be aligned for ArcFace.")
        if face.embedding is None:
            from insightface.utils import face_align
            aimg = face_align.norm_crop(np.ascontiguousarray(rgb[..., ::-1]), landmark=face.kps, image_size=self.recognizer.input_size[0])
            face.embedding = self.recognizer.get_feat(aimg).flatten().astype(np.float64)
        return face.embedding


def load_insightface(name: str, roots: list[str], provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5) -> FaceAnalyzer:
    """Load pack `name` from the insightface model folders; never downloads. Each .onnx is routed by insightface's
    own ModelRouter (by its input/output signature); the first detection and recognition models are used."""
    path = find_pack(name, roots)
    providers = resolve_providers(provider)
    _import("insightface", "The insightface face models")
    try:
        from insightface.model_zoo import model_zoo
    except Exception as e:
        raise FaceToolError(f"insightface is installed but broken ({type(e).__name__}: {e}). Reinstall it: pip install insightface==2.1") from e
    models = {}
    for f in sorted(glob.glob(os.path.join(path, "*.onnx"))):
        try:
            m = model_zoo.get_model(f, providers=providers)
        except Exception as e:
            raise FaceToolError(f"Could not load '{f}' with onnxruntime ({type(e).__name__}: {e}). The file is damaged or "
                                f"not an insightface model: download the '{name}' pack again and replace it.") from e
        if m is None:
            log.info("IDFusion: %s is not a model insightface recognises; ignored", f)
        elif m.taskname in ("detection", "recognition") and m.taskname not in models:
            models[m.taskname] = m
    if "detection" not in models:
        raise FaceToolError(f"Face model pack '{name}' in {path} has no face detection model (SCRFD/RetinaFace .onnx with "
                            f"5 or more outputs). {missing_pack_message(name, roots).split('. ', 1)[1]}")
    det = models["detection"]
    size = (det_size, det_size) if det_size > 0 else None
    det.prepare(0, input_size=size, det_thresh=det_thresh)
    rec = models.get("recognition")
    if rec is not None:
        rec.prepare(0)
    else:
        log.warning("IDFusion: face pack '%s' has no ArcFace recognition model: detection only, no identity embedding.", name)
    return FaceAnalyzer(name, "insightface", det, rec, provider, det_thresh, path)


def load_haar(min_size: int = 24, neighbors: int = 5, min_weight: float = 2.0) -> FaceAnalyzer:
    """OpenCV's frontal-face Haar cascade, shipped inside the opencv wheel: finds frontal faces, no landmarks, no
    identity. OpenCV 5 dropped the cascades, hence opencv<5 in requirements.txt."""
    c = cv2()
    data = getattr(getattr(c, "data", None), "haarcascades", None)
    xml = os.path.join(data or "", "haarcascade_frontalface_default.xml")
    if not hasattr(c, "CascadeClassifier") or not os.path.isfile(xml):
        raise FaceToolError(f"This OpenCV ({c.__version__}) ships no Haar cascade (OpenCV 5 removed them). "
                            f"Install opencv-python>=4.8,<5 (see requirements.txt).")
    cascade = c.CascadeClassifier(xml)
    # min_weight: true faces score ~5-10 in the cascade's last stage, stray texture hits below 1
    return FaceAnalyzer(HAAR, "haar", (cascade, min_size, neighbors), None, "CPU", min_weight, xml)


def _haar_detect(det, rgb, min_weight):
    cascade, min_size, neighbors = det
    c = cv2()
    gray = c.equalizeHist(c.cvtColor(np.ascontiguousarray(rgb), c.COLOR_RGB2GRAY))
    boxes, _levels, weights = cascade.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=neighbors, minSize=(min_size, min_size),
                                                        outputRejectLevels=True)
    return [Face(np.array([x, y, x + w, y + h], np.float64), float(s)) for (x, y, w, h), s in zip(boxes, np.ravel(weights))
            if s >= min_weight]


# ---------------------------------------------------------------------------------------------- choosing faces

def order_faces(faces: list[Face], order: str) -> list[Face]:
    if order == "largest":
        return sorted(faces, key=lambda f: -f.area)
    if order == "left to right":
        return sorted(faces, key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)
    if order == "most confident":
        return sorted(faces, key=lambda f: -f.score)
    raise FaceToolError(f"order must be one of {', '.join(ORDERS)}, got {order!r}.")


def pick(faces: list[Face], order: str, index: int) -> Face | None:
    """The index-th face in `order` (0 = first), or None when there are not that many."""
    faces = order_faces(faces, order)
    return faces[index] if 0 <= index < len(faces) else None


# ---------------------------------------------------------------------------------------------- crops

def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity transform (rotation, uniform scale, shift) taking src points to dst (Umeyama)."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / (s ** 2).sum() * len(src)
    return np.hstack([scale * r, (md - scale * r @ ms)[:, None]])


def crop_matrix(face: Face, size: int, margin: float) -> np.ndarray:
    """2x3 matrix mapping image pixels to a size x size crop. With landmarks: ArcFace alignment (eyes level),
    zoomed out by `margin` (0 = insightface's tight 112 crop). Without (Haar): the box's square, grown by margin."""
    if face.kps is not None:
        dst = (ARCFACE_112 - 56.0) / (1.0 + margin) + 56.0
        return _similarity(face.kps, dst * (size / 112.0))
    x1, y1, x2, y2 = face.bbox
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    s = size / side
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]], np.float64)


def warp(rgb: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    c = cv2()
    return c.warpAffine(rgb, m, (size, size), flags=c.INTER_LINEAR, borderMode=c.BORDER_REPLICATE)


def whole_image_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The no-face 'whole image' fallback: the centre square, resized."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return cv2().resize(np.ascontiguousarray(rgb[y:y + s, x:x + s]), (size, size), interpolation=cv2().INTER_AREA)


def draw_preview(rgb: np.ndarray, faces: list[Face], chosen: Face | None, colors=None) -> np.ndarray:
    """All faces thin grey, the chosen one thick green (or each face in its colour) with its landmarks."""
    c = cv2()
    img = np.ascontiguousarray(rgb.copy())
    t = max(1, round(max(img.shape[:2]) / 256))
    for i, f in enumerate(faces):
        col = colors[i] if colors else ((0, 255, 0) if f is chosen else (160, 160, 160))
        x1, y1, x2, y2 = (int(round(v)) for v in f.bbox)
        c.rectangle(img, (x1, y1), (x2, y2), col, 3 * t if (f is chosen or colors) else t)
        if f.kps is not None and (f is chosen or colors):
            for p in f.kps:
                c.circle(img, (int(p[0]), int(p[1])), 2 * t, (255, 0, 0), -1)
        if colors:
            c.putText(img, str(i + 1), (x1 + 2 * t, y1 + 14 * t), c.FONT_HERSHEY_SIMPLEX, 0.5 * t, col, t)
    return img


# ---------------------------------------------------------------------------------------------- masks

def box_mask(h: int, w: int, bbox, margin: float, feather: int) -> np.ndarray:
    """float32 (h, w): the box grown by `margin` (fraction of its size on each side), 1 inside; with feather > 0
    the edge ramps down over `feather` pixels outside that box (Gaussian-blurred, then max'ed with the hard box so the
    grown box itself stays exactly 1)."""
    x1, y1, x2, y2 = bbox
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    x1, y1, x2, y2 = (int(round(v)) for v in (x1 - mx, y1 - my, x2 + mx, y2 + my))
    m = np.zeros((h, w), np.float32)
    m[max(y1, 0):max(min(y2, h), 0), max(x1, 0):max(min(x2, w), 0)] = 1.0
    return feather_mask(m, feather)


def feather_mask(m: np.ndarray, feather: int) -> np.ndarray:
    if feather <= 0:
        return m
    c = cv2()
    k = 2 * feather + 1
    soft = c.GaussianBlur(c.dilate(m, np.ones((k, k), np.uint8)), (k, k), feather / 2.0)
    return np.maximum(soft, m).astype(np.float32)


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def mask_preview(rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The image with each identity's mask tinted in its own colour (PALETTE order = identity order)."""
    out = rgb.astype(np.float32)
    for i, m in enumerate(masks):
        col = np.array(PALETTE[i % len(PALETTE)], np.float32)
        a = 0.5 * m[..., None]
        out = out * (1 - a) + col * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- repaint crop/stitch

@dataclass
class StitchHandle:
    """What IDFusion Face Stitch needs to put a repainted crop back: the original image (B=1, float, H, W, C), the
    crop's box in it, and the blend mask in crop pixels (1 = take the repainted crop)."""
    image: object            # torch (1, H, W, C)
    box: tuple               # x1, y1, x2, y2 (ints, inside the image), a square unless clipped by the border
    blend: object            # torch (box_h, box_w): feathered face mask, exactly 0 outside its band
    crop_size: int


def context_box(face: Face, h: int, w: int, context: float) -> tuple:
    """A square around the face box, `context` times its size, shifted (not squashed) to fit inside the image."""
    x1, y1, x2, y2 = face.bbox
    side = int(round(max(x2 - x1, y2 - y1) * context))
    side = max(8, min(side, h, w))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    bx = int(round(min(max(cx - side / 2, 0), w - side)))
    by = int(round(min(max(cy - side / 2, 0), h - side)))
    return bx, by, bx + side, by + side
