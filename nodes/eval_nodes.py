"""Evaluation node (paper section 4.2): ArcFace identity similarity/distance and face-region SSIM/PSNR against
the reference."""
import math

import numpy as np

from ..idfusion import faces as F
from ..idfusion import metrics
from .common import CATEGORY
from .face_nodes import FACE_ANALYSIS, run, to_uint8


def evaluate(fa, rgb, ref_rgb, ref_face, size, margin):
    """Scores of one generated image; a missing face scores as a miss (similarity 0, distance 1, SSIM 0, PSNR 0)."""
    face = F.pick(fa.detect(rgb), "largest", 0)
    if face is None:
        return dict(found=False, similarity=0.0, distance=1.0, ssim=0.0, psnr=0.0)
    sim = metrics.cosine(fa.embed(rgb, face), fa.embed(ref_rgb, ref_face))
    a = F.warp(rgb, F.crop_matrix(face, size, margin), size).astype(np.float64) / 255.0
    b = F.warp(ref_rgb, F.crop_matrix(ref_face, size, margin), size).astype(np.float64) / 255.0
    return dict(found=True, similarity=sim, distance=1.0 - sim, ssim=metrics.ssim(a, b), psnr=metrics.psnr(a, b))


def ui_scores(row):
    """One image's scores for the `idfusion_scores` ui entry (read by scripts/face_benchmark.py from /history).
    The UI parses the same message with JSON.parse, which rejects Infinity, so a non-finite score (PSNR of identical
    crops) travels as its string, "inf"."""
    return {k: v if k == "found" else (float(v) if math.isfinite(v) else str(float(v))) for k, v in row.items()}


class IDFusionFaceEvaluate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "An insightface pack with ArcFace (antelopev2 or buffalo_l); the Haar "
                              "fallback has no identity embedding and is refused."}),
            "image": ("IMAGE", {"tooltip": "Generated image(s); the largest face of each is scored."}),
            "reference": ("IMAGE", {"tooltip": "The reference photo (first image used; its largest face)."}),
            "size": ("INT", {"default": 256, "min": 32, "max": 1024, "step": 8, "tooltip":
                     "Both faces are aligned to a square crop of this size before SSIM and PSNR."}),
            "margin": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                       "Context around the aligned face for SSIM/PSNR (0 = the tight ArcFace crop)."}),
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("similarity", "distance", "ssim", "psnr", "face_found", "report")
    OUTPUT_TOOLTIPS = ("ArcFace cosine similarity to the reference (mean over the batch; a missing face counts 0).",
                       "Identity distance = 1 - similarity.", "Face-crop SSIM (mean).", "Face-crop PSNR in dB (mean).",
                       "True when every image had a face.", "One line per image.")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Identity similarity (ArcFace cosine, distance = 1 - cos) and face SSIM/PSNR against the reference."

    def evaluate(self, face_analysis, image, reference, size, margin):
        if not face_analysis.has_identity:
            raise ValueError(f"face_analysis '{face_analysis.name}' has no ArcFace recognition model, so identity similarity "
                             f"cannot be measured: load antelopev2 or buffalo_l in IDFusion Load Face Analysis.")
        ref = to_uint8(reference[:1])[0]
        ref_face = run(F.pick, run(face_analysis.detect, ref), "largest", 0)
        if ref_face is None:
            raise ValueError("reference has no detectable face: use a clear frontal photo of the person.")
        rows = [run(evaluate, face_analysis, rgb, ref, ref_face, size, margin) for rgb in to_uint8(image)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("similarity", "distance", "ssim", "psnr")}
        lines = [f"image {i}: " + (f"similarity {r['similarity']:.4f} distance {r['distance']:.4f} ssim {r['ssim']:.4f} "
                                   f"psnr {r['psnr']:.2f} dB" if r["found"] else "no face") for i, r in enumerate(rows)]
        report = "\n".join(lines)
        found = all(r["found"] for r in rows)
        return {"ui": {"text": [report], "idfusion_scores": [ui_scores(r) for r in rows]},
                "result": (mean["similarity"], mean["distance"], mean["ssim"], mean["psnr"], found, report)}


NODE_CLASS_MAPPINGS = {"IDFusionFaceEvaluate": IDFusionFaceEvaluate}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionFaceEvaluate": "IDFusion Face Evaluate"}
