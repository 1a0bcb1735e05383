"""Fused attention, paper section 3 ("Fusion is all you need", Eqs. 1-7).

Shapes: b batch, N_h query tokens, N_c text tokens, N_f identity tokens, D inner dim (heads * dim_head),
C channels of the layer's hidden state.

    K_f = Linear_kf(h_f),  V_f = Linear_vf(h_f)                      (Eq. 2)
    h_f <- AvgPool2x2(h_f) on the largest layers (an optional token budget, not in the paper)
    K'  = [K_c; K_f1; ...; K_fn],  V' = [V_c; V_f1; ...; V_fn]       (Eqs. 3, 6)
    S   = softmax(M + scale * Q K'^T),  h = S V'                     (Eqs. 4, 5)
    M[q, k] = -inf  if k belongs to identity i and q lies in the region of some identity j != i   (Eq. 7)

Everything here is plain torch on tensors: no ComfyUI, no state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def project(h_f: torch.Tensor, linear_kf: torch.Tensor, linear_vf: torch.Tensor, weight: float = 1.0):
    """Eq. 2 for one reference at one layer. h_f (N_f, C), Linear weights (D, C) -> K_f, V_f (N_f, D).

    `weight` scales V_f: the identity's keys still compete for attention, its values are scaled.
    weight 0 is handled by not patching at all (bit-identical to the plain model)."""
    K_f = h_f @ linear_kf.t()
    V_f = h_f @ linear_vf.t()
    if weight != 1.0:
        V_f = V_f * weight
    return K_f, V_f


def pool_tokens(h_f: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Reference token budget: 2x2 average pooling of h_f laid out on its h x w token grid.
    h_f (..., h*w, C) -> (..., ceil(h/2)*ceil(w/2), C). Odd sides keep their last row/column, averaged over the
    cells that exist (ceil_mode, no padding). Eq. 2 is linear, so pooling h_f then projecting equals pooling
    K_f/V_f, at a quarter of the projection cost."""
    *lead, n, c = h_f.shape
    if n != h * w:
        raise ValueError(f"pool_tokens: {n} tokens do not lie on a {h}x{w} grid.")
    x = h_f.reshape(-1, h, w, c).permute(0, 3, 1, 2)                      # (B, C, h, w)
    x = F.avg_pool2d(x, 2, ceil_mode=True)
    return x.permute(0, 2, 3, 1).reshape(*lead, -1, c)


def concat_keys(k_c: torch.Tensor, v_c: torch.Tensor, K_f: list[torch.Tensor], V_f: list[torch.Tensor]):
    """Eqs. 3/6: K' = [K_c; K_f1; ...]. k_c (b, N_c, D), each K_f (N_fi, D) shared by the batch."""
    b = k_c.shape[0]
    K = torch.cat([k_c] + [k.to(k_c.dtype).unsqueeze(0).expand(b, -1, -1) for k in K_f], dim=1)
    V = torch.cat([v_c] + [v.to(v_c.dtype).unsqueeze(0).expand(b, -1, -1) for v in V_f], dim=1)
    return K, V


def region_tokens(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A region mask (H, W) in [0, 1] -> (h*w,) bool on a layer's token grid.

    Area-resized and thresholded at 0.5, so a region keeps its share of each token cell; a region that
    would vanish on a coarse grid keeps its best-covered cell, so every identity stays placed."""
    m = F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0].flatten()
    inside = m > 0.5
    if not bool(inside.any()) and bool((m > 0).any()):
        inside = m == m.max()
    return inside


def blocked_identities(inside: torch.Tensor, confine: torch.Tensor | None = None) -> torch.Tensor:
    """inside (N_h, n) bool: query q lies in region M_i. Returns blocked (N_h, n) bool.

    Eq. 7: identity i is blocked for q if q lies in the region of some other identity j != i.
    Queries outside every region see all identities. `confine` (n,) bool additionally hides identity i
    from queries outside its own region (a single identity with an attention mask)."""
    count = inside.sum(dim=1, keepdim=True)
    blocked = (count - inside.to(count.dtype)) > 0
    if confine is not None:
        blocked = blocked | (confine.unsqueeze(0) & ~inside)
    return blocked


def key_allow_mask(blocked: torch.Tensor, tokens_per_identity: list[int], n_text: int) -> torch.Tensor:
    """Expand blocked (N_h, n) to a key mask (N_h, N_c + sum N_fi), True = may attend. Text keys are never
    masked, so every query keeps at least N_c keys and the softmax is always defined."""
    owner = torch.repeat_interleave(torch.arange(len(tokens_per_identity), device=blocked.device),
                                    torch.tensor(tokens_per_identity, device=blocked.device))
    text = torch.ones(blocked.shape[0], n_text, dtype=torch.bool, device=blocked.device)
    return torch.cat([text, ~blocked[:, owner]], dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, allow: torch.Tensor):
    """Eqs. 4-5 with the Eq. 7 mask. q (b, N_h, D), k/v (b, N_k, D) -> (b, N_h, D).

    allow: True = may attend; (N_h, N_k) shared by the batch, or (b, N_h or 1, N_k) per row (training drops
    references per row). A boolean mask goes straight to SDPA, broadcast over heads."""
    b, n_h, d = q.shape
    dh = d // heads
    q, k, v = (t.reshape(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))  # (b, heads, N, dh)
    mask = allow[None, None] if allow.ndim == 2 else allow[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(dh))
    return out.transpose(1, 2).reshape(b, n_h, d)
