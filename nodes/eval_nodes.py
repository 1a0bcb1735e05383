"""Evaluation node (paper section 4.2, plus MultiID-Bench's and UMO's identity metrics): ArcFace identity similarity
to the reference(s), Hungarian matching of the faces of multi-person pictures, copy-paste against an optional ground
truth, leakage, ID-Conf, and face-region SSIM/PSNR. The formulas are in idfusion/metrics.py."""
import math

import numpy as np

from ..idfusion import faces as F
from ..idfusion import metrics
from ..idfusion.chart import fidelity_chart
from .common import CATEGORY, check_inputs, require_inputs
from .face_nodes import FACE_ANALYSIS, MAX_IDENTITIES, run, to_uint8
from .previews import save_temp_png

BASELINE = 0.46  # median similarity of two real photos of one person (WithAnyone, arXiv 2510.14975, Fig. 2)

NAN = float("nan")


def _crop(rgb, face, size, margin):
    return F.warp(rgb, F.crop_matrix(face, size, margin), size).astype(np.float64) / 255.0


def evaluate(fa, rgb, refs, size, margin, gt_faces=None):
    """Scores of one generated image against `refs` [(rgb, face, embedding or None)], one per person.

    With ArcFace, every face found is matched to the references (Hungarian, metrics.identity_scores). Without it
    (Haar, or a pack without a recognizer) faces cannot be told apart, so they are paired by place: the largest face
    with one reference, the i-th face from the left with reference i with several (the order IDFusion Face Masks
    numbers identities in); identity scores are then NaN. A reference without a face scores as a miss (similarity 0,
    SSIM 0, PSNR 0), as a generated image without a face always has."""
    faces = fa.detect(rgb)
    n = len(refs)
    row = dict(found=False, similarity=0.0, distance=1.0, ssim=0.0, psnr=0.0, sim_gt=None, copy_paste=None,
               leakage=None, id_conf=None, faces=[])
    if fa.has_identity:
        embs = [fa.embed(rgb, f) for f in faces]
        s = metrics.identity_scores(embs, [r[2] for r in refs], gt_faces)
        match = s["match"]
        sims = s["sim_ref"]
        row.update(leakage=s["leakage"], id_conf=metrics.mean_defined(s["id_conf"]))
        if gt_faces is not None:
            row.update(sim_gt=metrics.mean_defined(s["sim_gt"]), copy_paste=metrics.mean_defined(s["copy_paste"]))
        per_face = [dict(sim=s["face_sim"][i], sim_gt=s["sim_gt"][i], copy_paste=s["copy_paste"][i]) for i in range(len(faces))]
    else:
        place = {id(f): k for k, f in enumerate(F.order_faces(faces, "largest" if n == 1 else "left to right")[:n])}
        match = [place.get(id(f)) for f in faces]
        sims = [NAN] * n
        per_face = [dict(sim=None, sim_gt=None, copy_paste=None) for _ in faces]
    ssims, psnrs = [0.0] * n, [0.0] * n
    for i, m in enumerate(match):
        if m is not None:
            a, b = _crop(rgb, faces[i], size, margin), _crop(refs[m][0], refs[m][1], size, margin)
            ssims[m], psnrs[m] = metrics.ssim(a, b), metrics.psnr(a, b)
    matched = {m for m in match if m is not None}
    sim = float(np.mean(sims))
    row.update(found=len(matched) == n, similarity=sim, distance=1.0 - sim, ssim=float(np.mean(ssims)),
               psnr=float(np.mean(psnrs)))
    row["faces"] = [dict(box=[round(float(v), 1) for v in f.bbox], match=match[i], **per_face[i]) for i, f in enumerate(faces)]
    return row


def _jsonable(v):
    """None stays null; a non-finite float travels as its string ("inf", "nan"), since the UI parses the message with
    JSON.parse, which has no Infinity or NaN."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v) if math.isfinite(v) else str(float(v))


def ui_scores(row):
    """One image's scores for the `idfusion_scores` ui entry (read by scripts/face_benchmark.py from /history and by
    js/face_evaluate.js): found, similarity, distance, ssim, psnr, sim_gt, copy_paste, leakage, id_conf (null when
    not defined) and faces [{box, match, sim, sim_gt, copy_paste}]."""
    return _jsonable(row)


def _num(v, spec):
    return "-" if v is None else format(v, spec)


def report_line(i, r, n_refs):
    if not r["faces"]:
        return f"image {i}: no face"
    if math.isnan(r["similarity"]):
        text = f"image {i}: no identity model (similarity not measured) ssim {r['ssim']:.4f} psnr {r['psnr']:.2f} dB"
    else:
        text = (f"image {i}: similarity {r['similarity']:.4f} distance {r['distance']:.4f} ssim {r['ssim']:.4f} "
                f"psnr {r['psnr']:.2f} dB")
    if r["sim_gt"] is not None:
        text += f" sim_gt {r['sim_gt']:.4f} copy_paste {_num(r['copy_paste'], '+.4f')}"
    if len(r["faces"]) > 1 or n_refs > 1:
        text += f" leakage {_num(r['leakage'], '.4f')} id_conf {_num(r['id_conf'], '.4f')}"
    for k, f in enumerate(r["faces"]):
        who = "unmatched" if f["match"] is None else f"reference {f['match'] + 1}"
        sim = "" if f["sim"] is None else f" similarity {f['sim']:.4f}"
        text += f"\n  face {k} box {tuple(f['box'])}: {who}{sim}"
    return text


class IDFusionFaceEvaluate:
    @classmethod
    def INPUT_TYPES(cls):
        ref_tip = ("Another person's reference photo (its largest face), for pictures with several people: every face "
                   "is then matched to the references (Hungarian) and leakage and ID-Conf are reported.")
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "From IDFusion Load Face Analysis. An insightface pack with ArcFace "
                              "(antelopev2, buffalo_l) measures identity; the Haar fallback (or a pack without ArcFace) "
                              "finds faces and measures SSIM/PSNR only: identity scores are then NaN."}),
            "image": ("IMAGE", {"tooltip": "Generated image(s); every face of each is found and matched to the reference(s)."}),
            "reference": ("IMAGE", {"tooltip": "The reference photo (first image used; its largest face)."}),
            "size": ("INT", {"default": 256, "min": 32, "max": 1024, "step": 8, "tooltip":
                     "Both faces are aligned to a square crop of this size before SSIM and PSNR."}),
            "margin": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                       "Context around the aligned face for SSIM/PSNR (0 = the tight ArcFace crop)."}),
        }, "optional": {
            "ground_truth": ("IMAGE", {"tooltip": "Optional: other photo(s) of the same person(s), not the reference. Adds "
                             "Sim(GT) and copy-paste M_CP (MultiID-Bench: +1 = a copy of the reference, -1 = like the "
                             "ground truth). Every face of every image is used, matched to the generated faces."}),
            **{f"reference_{k}": ("IMAGE", {"tooltip": ref_tip}) for k in range(2, MAX_IDENTITIES + 1)},
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("similarity", "distance", "ssim", "psnr", "face_found", "report")
    OUTPUT_TOOLTIPS = ("Sim(Ref): ArcFace cosine similarity to the reference(s) (mean over references and images; a missing "
                       "face counts 0; NaN without an ArcFace model).",
                       "Identity distance = 1 - similarity.", "Face-crop SSIM (mean).", "Face-crop PSNR in dB (mean).",
                       "True when every image had a face for every reference.",
                       "One block per image: the scores (Sim(GT), copy-paste, leakage, ID-Conf where defined), then each "
                       "face's box and the reference it matched.")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Identity similarity (ArcFace cosine, distance = 1 - cos), copy-paste against an optional ground truth, "
                   "leakage and ID-Conf for several people, and face SSIM/PSNR against the reference.")

    @classmethod
    def VALIDATE_INPUTS(cls, margin=None):
        return check_inputs(cls, margin=margin)  # NaN passes ComfyUI's min/max check

    def evaluate(self, face_analysis, image, reference, size, margin, ground_truth=None, **more_refs):
        require_inputs(type(self), size=size, margin=margin)  # linked values and Python callers
        fa = face_analysis
        ref_images = [("reference", reference)] + [(k, more_refs[k]) for k in sorted(more_refs) if more_refs[k] is not None]
        refs = []
        for name, img in ref_images:
            rgb = to_uint8(img[:1])[0]
            face = run(F.pick, run(fa.detect, rgb), "largest", 0)
            if face is None:
                raise ValueError(f"{name} has no detectable face: use a clear frontal photo of the person.")
            refs.append((rgb, face, run(fa.embed, rgb, face) if fa.has_identity else None))
        gt_faces = None
        if ground_truth is not None and fa.has_identity:
            gt_faces = [run(fa.embed, rgb, f) for rgb in to_uint8(ground_truth) for f in run(fa.detect, rgb)]
            if not gt_faces:
                raise ValueError("ground_truth has no detectable face: use other photos of the reference person(s), or "
                                 "disconnect it.")
        rows = [run(evaluate, fa, rgb, refs, size, margin, gt_faces) for rgb in to_uint8(image)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("similarity", "distance", "ssim", "psnr")}
        lines = [report_line(i, r, len(refs)) for i, r in enumerate(rows)]
        if ground_truth is not None and not fa.has_identity:
            lines.append(f"ground_truth ignored: '{fa.name}' has no ArcFace model, so Sim(GT) and copy-paste cannot be measured.")
        report = "\n".join(lines)
        found = all(r["found"] for r in rows)
        ui = {"text": [report], "idfusion_scores": [ui_scores(r) for r in rows]}
        points = [(f"image {i}", r["copy_paste"], r["sim_gt"]) for i, r in enumerate(rows) if r["copy_paste"] is not None]
        if points:  # with a ground truth: the benchmark's fidelity-against-copy-paste chart, one point per image
            ui["images"] = [save_temp_png(np.asarray(fidelity_chart(points, BASELINE)), "IDFusion_copy_paste")]
        return {"ui": ui, "result": (mean["similarity"], mean["distance"], mean["ssim"], mean["psnr"], found, report)}


NODE_CLASS_MAPPINGS = {"IDFusionFaceEvaluate": IDFusionFaceEvaluate}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionFaceEvaluate": "IDFusion Face Evaluate"}
