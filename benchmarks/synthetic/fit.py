"""The instrument: read a synthetic picture by fitting the domain's own renderer to it (analysis by synthesis).

No learned model is involved. For every picture the fit finds the renderer parameters (identity geometry, the head's
position and turn, the expression) whose drawing explains the picture best, with the free colours (background,
hair, skin, eyes) solved in closed form at every step: a drawing is a sum of colour x visibility, linear in the
colours, so for a given geometry the best colours are a 4x4 least-squares solve per picture (variable projection).

    1. coarse: the picture at half resolution, soft edges annealed from 3 px to 1 px, expressions as a soft mixture,
       three starting turns (left, front, right); the best start is kept;
    2. fine: full resolution, edges down to the drawing's own 0.5 px;
    3. expression: each of the four mouths is fitted in a window around the mouth; the best explains the picture;
    4. colours are solved once more with the final geometry and converted to CIELAB.

Read-outs: identity (16 numbers: three CIELAB colours and seven shape parameters), expression, pose (nearest of the
three turns), background (nearest named colour, and its RGB), position, residual. Errors are reported in CIELAB
ΔE (CIE76) and in pixels; `calibrate` says how well the instrument reads pictures whose truth is known.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import domain as D

S = D.SIZE
# fitted ranges: the prior's ranges widened by a quarter on each side, so a picture slightly outside still fits
_WIDEN = 0.25
BOUNDS = {k: (lo - _WIDEN * (hi - lo), hi + _WIDEN * (hi - lo)) for k, (lo, hi) in D.GEOMETRY.items()}
BOUNDS.update({"jx": (-0.12, 0.12), "jy": (-0.12, 0.12), "turn": (-0.10, 0.10)})
NAMES = list(BOUNDS)
# pixel size of each geometry parameter's error: widths and spacing are reported as full distances
GEOMETRY_PX = {"face_w": 2 * S, "face_h": 2 * S, "eye_spacing": 2 * S, "eye_size": S, "mouth_w": 2 * S,
               "hair_volume": S}


def _values(u: torch.Tensor) -> dict:
    """Unconstrained (B, k) -> bounded parameter values (fractions of SIZE; fringe of the face height)."""
    v = torch.sigmoid(u)
    return {k: lo + (hi - lo) * v[:, i] for i, (k, (lo, hi)) in enumerate(BOUNDS.items())}


def _logit(values: dict) -> torch.Tensor:
    cols = []
    for k, (lo, hi) in BOUNDS.items():
        t = ((values[k] - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)
        cols.append(torch.log(t / (1 - t)))
    return torch.stack(cols, 1)


def _renderer_params(v: dict, expression: torch.Tensor, offset: float = 0.0) -> dict:
    """Fitted values -> the renderer's pixel parameters; expression (B, 4) weights."""
    p = {"cx": offset + S / 2 + v["jx"] * S, "cy": S * 0.53 + v["jy"] * S, "aw": v["face_w"] * S, "ah": v["face_h"] * S,
         "turn": v["turn"] * S, "spacing": v["eye_spacing"] * S, "eye_r": v["eye_size"] * S, "mouth_w": v["mouth_w"] * S,
         "hair_v": v["hair_volume"] * S, "fringe": v["fringe"]}
    for i, ex in enumerate(D.EXPRESSIONS):
        p[f"ex_{ex}"] = expression[:, i]
    return p


_FIXED = {k: torch.tensor(c, dtype=torch.float32) / 255 for k, c in D.FIXED.items()}


def _explain(picture: torch.Tensor, p: dict, x, y, tau: float, ridge: float = 1e-3):
    """Best colours for this geometry and the remaining error. picture (B, 3, H, W) in [0, 1].
    -> (mean squared error per picture (B,), colours {free key: (B, 3)})."""
    w = D.visibility(D.layers(p, x, y, tau))
    fixed = sum(_FIXED[k].view(1, 3, 1, 1) * w[k][:, None] for k in _FIXED if k in w)
    target = picture - fixed                                              # (B, 3, H, W)
    W = torch.stack([w[k] if torch.is_tensor(w.get(k)) else torch.zeros_like(w["background"]) for k in D.FREE], 1)
    W = W.flatten(2)                                                      # (B, 4, HW)
    A = W @ W.transpose(1, 2)                                             # (B, 4, 4)
    b = W @ target.flatten(2).transpose(1, 2)                             # (B, 4, 3)
    n = W.shape[-1]
    reg = ridge * n * torch.eye(4)
    colours = torch.linalg.solve(A + reg, b + reg @ torch.full_like(b, 0.5))   # an invisible layer stays grey
    residual = target - torch.einsum("bkc,bkn->bcn", colours, W).view_as(target)
    return residual.pow(2).mean((1, 2, 3)), dict(zip(D.FREE, colours.unbind(1)))


def _half(picture):
    return torch.nn.functional.avg_pool2d(picture, 2)


def _optimise(picture, u, logits, x, y, steps, taus, lr, fit_expression=True):
    u = u.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(fit_expression)
    opt = torch.optim.Adam([u, logits] if fit_expression else [u], lr=lr)
    for i in range(steps):
        tau = taus[0] * (taus[1] / taus[0]) ** (i / max(1, steps - 1))     # geometric annealing of the edges
        err, _ = _explain(picture, _renderer_params(_values(u), torch.softmax(logits, 1)), x, y, tau)
        opt.zero_grad()
        err.sum().backward()
        opt.step()
    return u.detach(), logits.detach()


@torch.no_grad()
def _error(picture, u, expression, x, y, tau):
    return _explain(picture, _renderer_params(_values(u), expression), x, y, tau)


def fit(pictures: torch.Tensor, coarse_steps: int = 60, fine_steps: int = 25, mouth_steps: int = 20,
        chunk: int = 128) -> list[dict]:
    """Read one-face pictures (B, 3, SIZE, SIZE) in [-1, 1]. -> per picture {"identity": dict like
    domain.random_identity, "expression", "pose", "background", "background_rgb", "jitter", "rms"}."""
    out = []
    for start in range(0, len(pictures), chunk):
        out += _fit_chunk(((pictures[start:start + chunk].float() + 1) / 2).clamp(0, 1),
                          coarse_steps, fine_steps, mouth_steps)
    return out


def _fit_chunk(pic, coarse_steps, fine_steps, mouth_steps):
    B = len(pic)
    torch.manual_seed(0)
    x1, y1 = D.grid(S)
    x2, y2 = (t[:, ::2, ::2] + 0.5 for t in (x1, y1))                   # half resolution: 2x2 block centres
    # 1. coarse, from three starting turns; expression as a soft mixture
    mid = {k: torch.full((B,), (lo + hi) / 2) for k, (lo, hi) in BOUNDS.items()}
    mid["jx"] = mid["jy"] = torch.zeros(B)
    starts = []
    for turn in D.POSES.values():
        starts.append(_logit({**mid, "turn": torch.full((B,), turn)}))
    u0 = torch.cat(starts)
    logits0 = torch.zeros(3 * B, len(D.EXPRESSIONS))
    half = _half(pic).repeat(3, 1, 1, 1)
    u, logits = _optimise(half, u0, logits0, x2, y2, coarse_steps, (3.0, 1.0), 0.08)
    err, _ = _error(half, u, torch.softmax(logits, 1), x2, y2, 1.0)
    best = err.view(3, B).argmin(0)
    pick = lambda t: t.view(3, B, *t.shape[1:])[best, torch.arange(B)]   # noqa: E731
    u, logits = pick(u), pick(logits)
    # 2. fine, at full resolution
    u, logits = _optimise(pic, u, logits, x1, y1, fine_steps, (1.0, D.TAU), 0.03)
    # 3. each expression's mouth, fitted in a window around the mouth (the rest of the face is settled)
    v = _values(u)
    mx = (S / 2 + (v["jx"] + v["turn"]) * S).round()
    my = (S * 0.53 + v["jy"] * S + 0.45 * v["face_h"] * S).round()
    wy, wx = torch.meshgrid(torch.arange(-14, 15, dtype=torch.float32), torch.arange(-20, 21, dtype=torch.float32), indexing="ij")
    xs = (mx.view(-1, 1, 1) + wx).clamp(0, S - 1)
    ys = (my.view(-1, 1, 1) + wy).clamp(0, S - 1)
    window = pic[torch.arange(B)[:, None, None], :, ys.long(), xs.long()].permute(0, 3, 1, 2)   # (B, 3, h, w)
    K = len(D.EXPRESSIONS)
    hard = torch.eye(K).repeat_interleave(B, 0)                           # (K*B, K): every mouth for every picture
    uk, _ = _optimise(window.repeat(K, 1, 1, 1), u.repeat(K, 1), torch.log(hard + 1e-6), xs.repeat(K, 1, 1) + 0.5,
                      ys.repeat(K, 1, 1) + 0.5, mouth_steps, (1.0, D.TAU), 0.02, fit_expression=False)
    err_k, _ = _error(window.repeat(K, 1, 1, 1), uk, hard, xs.repeat(K, 1, 1) + 0.5, ys.repeat(K, 1, 1) + 0.5, D.TAU)
    choice = err_k.view(K, B).argmin(0)
    mouth = _values(uk)["mouth_w"].view(K, B)[choice, torch.arange(B)]
    u = _logit({**_values(u), "mouth_w": mouth})
    expression = torch.eye(K)[choice]
    # 4. final colours and residual
    err, colours = _error(pic, u, expression, x1, y1, D.TAU)
    v = _values(u)
    labs = {k: D.srgb_to_lab(colours[k].clamp(0, 1).numpy()) for k in D.FREE}
    bg_rgb = (colours["background"].clamp(0, 1).numpy() * 255)
    named = np.array(list(D.BACKGROUNDS.values()), dtype=np.float64)
    poses = np.array(list(D.POSES.values()))
    out = []
    for i in range(B):
        ident = {"skin": labs["skin"][i], "hair": labs["hair"][i], "eyes": labs["eyes"][i],
                 **{k: float(v[k][i]) for k in D.GEOMETRY}}
        out.append({"identity": ident, "expression": D.EXPRESSIONS[int(choice[i])],
                    "pose": list(D.POSES)[int(np.abs(poses - float(v["turn"][i])).argmin())],
                    "turn": float(v["turn"][i]),
                    "background": list(D.BACKGROUNDS)[int(np.linalg.norm(named - bg_rgb[i], axis=1).argmin())],
                    "background_rgb": bg_rgb[i].round(1).tolist(), "jitter": (float(v["jx"][i]), float(v["jy"][i])),
                    "rms": float(err[i].sqrt() * 255),
                    "fitted": {"u": u[i].tolist(), "expression": int(choice[i]),
                               "colours": {k: colours[k][i].clamp(0, 1).tolist() for k in D.FREE}}})
    return out


@torch.no_grad()
def redraw(reads: list[dict]) -> torch.Tensor:
    """The drawings the fit found, (B, 3, SIZE, SIZE) in [0, 1]: what the instrument thinks each picture shows."""
    u = torch.tensor([r["fitted"]["u"] for r in reads])
    expression = torch.eye(len(D.EXPRESSIONS))[[r["fitted"]["expression"] for r in reads]]
    x, y = D.grid(S)
    w = D.visibility(D.layers(_renderer_params(_values(u), expression), x, y, D.TAU))
    colours = {k: torch.tensor([r["fitted"]["colours"][k] for r in reads]) for k in D.FREE}
    colours.update({k: v.expand(len(reads), 3) for k, v in _FIXED.items()})
    return D.composite(w, colours).clamp(0, 1)


# ---- comparing read identities with true ones ------------------------------------------------------------------
SCALE = D.identity_scale()
MEAN = D.identity_scale(mean=True)


def identity_errors(read: dict, true: dict) -> dict:
    """Per attribute: colour ΔE (CIE76) and geometry in pixels (fringe: pixels of fringe depth)."""
    out = {c: float(D.delta_e(read[c], true[c])) for c in D.COLOURS}
    for k in D.GEOMETRY:
        if k == "fringe":
            out[k] = abs(read[k] * 2 * read["face_h"] - true[k] * 2 * true["face_h"]) * S
        else:
            out[k] = abs(read[k] - true[k]) * GEOMETRY_PX[k]
    return out


def distance(read: dict, candidates: list[dict]) -> np.ndarray:
    """Distance from a read identity to each candidate in the identity space, each dimension in units of the prior's
    spread (domain.identity_scale): fixed by the domain, not tuned on any result."""
    r = D.identity_vector(read) / SCALE
    c = np.stack([D.identity_vector(x) for x in candidates]) / SCALE
    return np.linalg.norm(c - r, axis=1)


def retrieval_rank(read: dict, true_index: int, candidates: list[dict]) -> int:
    """0 when the true identity is the nearest of the candidates."""
    d = distance(read, candidates)
    return int((d < d[true_index]).sum())


def summarise(reads: list[dict], truths: list[dict], scenes: list[dict] | None = None) -> dict:
    """Mean and standard error of each attribute's error, and scene accuracies where scenes are given."""
    errs = [identity_errors(r["identity"], t) for r, t in zip(reads, truths)]
    out = {}
    for k in errs[0]:
        a = np.array([e[k] for e in errs])
        out[k] = {"mean": float(a.mean()), "se": float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0,
                  "n": len(a)}
    if scenes is not None:
        for k in D.SCENE_ATTRS:
            hits = np.array([r[k] == s[k] for r, s in zip(reads, scenes)], dtype=float)
            out[k] = {"p": float(hits.mean()), "se": float(math.sqrt(max(hits.mean() * (1 - hits.mean()), 1e-12) / len(hits))),
                      "n": len(hits)}
    return out
