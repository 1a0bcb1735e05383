"""Evaluation metrics of the paper's section 4.2: identity = cosine similarity of ArcFace embeddings (distance =
1 - cos); face quality = SSIM and PSNR on face crops. Plain numpy, float64; checked against scikit-image in tests."""
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
