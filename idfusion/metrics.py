"""Evaluation metrics of the paper's section 4.2: identity = cosine similarity of ArcFace embeddings (distance =
1 - cos); face quality = SSIM and PSNR on face crops. Plain numpy, float64; checked against scikit-image in tests.
Below them, the literature's identity metrics over any embedding vectors: MultiID-Bench's copy-paste, Hungarian
matching, leakage, Sim(Ref)/Sim(GT), and UMO's ID-Conf (see the section's comment for the sources)."""
from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf for identical images."""
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def _gauss_filter(img: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian (truncated at `radius`), 'reflect' borders like scipy.ndimage's default."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="symmetric")  # numpy 'symmetric' == scipy 'reflect' (edge sample repeated)
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * radius + 1))
    return out


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, averaged over
    channels; images (H, W) or (H, W, C) in [0, data_range]. The border (window radius) is left out of the mean."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of one shape, got {x.shape} and {y.shape}.")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    radius = int(3.5 * sigma + 0.5)  # skimage's truncate=3.5 -> 11x11 at sigma 1.5
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch], y[..., ch]
        f = lambda z: _gauss_filter(z, sigma, radius)
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma * ma, f(b * b) - mb * mb, f(a * b) - ma * mb
        s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
        vals.append(s[radius:-radius or None, radius:-radius or None].mean())
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------- identity metrics
# Copy-paste, matching, leakage and ID-Conf over identity embeddings (ArcFace in Face Evaluate; any identity vectors
# work, e.g. the synthetic domain's fitted identity parameters). Definitions from:
#   MultiID-Bench (WithAnyone), MultiID-Bench/metrics/arcface_metric.py: copy-paste M_CP, Hungarian matching of
#     generated faces to references, leakage (mean similarity of the non-matching pairs), Sim(Ref), Sim(GT);
#   bytedance/UMO, eval/id_conf_xversebench.py: ID-Conf.
# Similarity matrices are (generated faces, references), as in MultiID-Bench.

def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64).ravel()
    n = np.linalg.norm(v)
    if n == 0:
        raise ValueError("An embedding is all zeros: it has no direction, so no angle or similarity.")
    return v / n


def angle(a, b) -> float:
    """Angle in radians between two embeddings, arccos of their cosine. Computed as 2 atan2(|a - b|, |a + b|) on the
    unit vectors, which is exact near 0 and pi where arccos loses half the digits (MultiID-Bench's clipped arccos
    agrees to ~1e-6 there)."""
    a, b = _unit(a), _unit(b)
    return float(2.0 * np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b)))


def copy_paste(g, t, r, eps: float = 1e-6) -> float:
    """MultiID-Bench's copy-paste M_CP = (theta(g, t) - theta(g, r)) / theta(t, r) for a generated face g, a
    ground-truth photo t of the same person and the reference r: +1 when g is the reference (a copy), -1 when g is the
    ground truth, 0 halfway. When the reference and the ground truth are the same picture (theta(t, r) < eps) copying
    and fidelity cannot be told apart and it is 0, as in the original."""
    t_tr = angle(t, r)
    if t_tr < eps:
        return 0.0
    return (angle(g, t) - angle(g, r)) / t_tr


def similarity_matrix(gen, refs) -> np.ndarray:
    """Cosine similarities, float64 (n generated, n references); either list may be empty."""
    g, r = [_unit(v) for v in gen], [_unit(v) for v in refs]
    if not g or not r:
        return np.zeros((len(g), len(r)))
    return np.stack(g) @ np.stack(r).T


def hungarian_match(sim) -> list[tuple[int, int]]:
    """[(generated face, reference)] pairs maximising the total similarity, min(rows, cols) of them, sorted by row
    (scipy's linear_sum_assignment on -sim, as MultiID-Bench; scipy ships with every ComfyUI)."""
    sim = np.asarray(sim, np.float64)
    if sim.size == 0:
        return []
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(-sim)
    return sorted(zip(rows.tolist(), cols.tolist()))


def leakage(sim, pairs=None) -> float | None:
    """MultiID-Bench's leakage: the mean similarity of the pairs the Hungarian matching did not match (each generated
    face against the other people's references). None when every entry is matched (one face, one reference)."""
    sim = np.asarray(sim, np.float64)
    mask = np.ones(sim.shape, bool)
    for r, c in hungarian_match(sim) if pairs is None else pairs:
        mask[r, c] = False
    return float(sim[mask].mean()) if mask.any() else None


def id_conf(sim) -> list[float | None]:
    """UMO's ID-Conf per reference (column): min(1, (s1 - s2) / s1) over its two highest similarities to the
    generated faces; 0 when s1 <= 0. None when there are fewer than two generated faces (UMO scores only pictures
    with several faces). 1 = the identity is on exactly one face, 0 = two faces carry it equally."""
    sim = np.asarray(sim, np.float64)
    if sim.shape[0] < 2:
        return [None] * sim.shape[1]
    out = []
    for col in sim.T:
        s1, s2 = np.sort(col)[::-1][:2]
        out.append(float(min(1.0, (s1 - s2) / s1)) if s1 > 0 else 0.0)
    return out


def mean_defined(values):
    """Mean of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def identity_scores(gen, refs, gts=None) -> dict:
    """All identity metrics of one generated picture: `gen` its faces' embeddings, `refs` one embedding per reference
    (person), `gts` optional ground-truth faces (other photos of the same people). Returns
      sim: (gen, refs) similarity matrix; match: per generated face its reference index or None (Hungarian);
      face_sim: per face the similarity to its match; sim_ref: per reference its matched similarity (0 without a face);
      leakage, id_conf (per reference) and, with gts, sim_gt and copy_paste per face (None where unmatched).
    Generated faces are matched to references and, separately, to the ground-truth faces (both Hungarian), and
    M_CP uses each face's two matches, as MultiID-Bench's multi-person copy-paste does."""
    sim = similarity_matrix(gen, refs)
    pairs = hungarian_match(sim)
    match = [None] * len(gen)
    for r, c in pairs:
        match[r] = c
    sim_ref = [0.0] * len(refs)
    for r, c in pairs:
        sim_ref[c] = float(sim[r, c])
    out = dict(sim=sim, match=match, face_sim=[None if m is None else float(sim[i, m]) for i, m in enumerate(match)],
               sim_ref=sim_ref, leakage=leakage(sim, pairs), id_conf=id_conf(sim),
               sim_gt=[None] * len(gen), copy_paste=[None] * len(gen))
    if gts is not None and len(gts) and len(gen):
        sim_gt = similarity_matrix(gen, gts)
        for r, c in hungarian_match(sim_gt):
            out["sim_gt"][r] = float(sim_gt[r, c])
            if match[r] is not None:
                out["copy_paste"][r] = copy_paste(gen[r], gts[c], refs[match[r]])
    return out
