"""Test helpers: random identities and a float64 reference implementation of the paper's Eqs. 1-7,
written independently of idfusion/fusion.py (loops over heads and identities, explicit softmax)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from idfusion_pack.idfusion.adapter import find_layers, model_family
from idfusion_pack.idfusion.identity import Identity


def random_identity(model_patcher, refs=1, tokens=(6,), seed=0, name="id"):
    """An Identity with random h_f (N tokens per reference, each layer's channel width)."""
    g = torch.Generator().manual_seed(seed)
    layers = find_layers(model_patcher.model.diffusion_model)
    tokens = list(tokens) * refs if len(tokens) == 1 else list(tokens)
    h_f = [{l.name: torch.randn(n, l.channels, generator=g) for l in layers} for n in tokens[:refs]]
    ctx = model_patcher.model.model_config.unet_config["context_dim"]
    return Identity(layers, model_family(model_patcher), {"mode": "cached", "timestep": 0, "text": "zeros"},
                    h_f, [torch.zeros(1, 4, 8, 8)] * refs, torch.zeros(1, 77, ctx), None, name)


def region_tokens_reference(mask, h, w):
    """Documented rule: area-average each token cell, inside if > 0.5; a region that would vanish keeps its
    best-covered cell(s)."""
    m = F.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float64)[None, None], (h, w))[0, 0].flatten().numpy()
    inside = m > 0.5
    if not inside.any() and (m > 0).any():
        inside = m == m.max()
    return inside


def fused_attention_reference(n, context, attn2, adapter, layer, identities, regions, weight, cond_rows, hw):
    """Eqs. 1-7 in float64. n (B, N_h, C) attn2's query input, context (B, N_c, ctx).
    identities: list of Identity; regions: list of (H, W) masks or None; cond_rows: bool per row (uncond
    rows see text only). Returns attn2's output after to_out, (B, N_h, C)."""
    d = lambda t: t.detach().to(torch.float64).numpy()
    Wq, Wk, Wv = d(attn2.to_q.weight), d(attn2.to_k.weight), d(attn2.to_v.weight)
    Wo, bo = d(attn2.to_out[0].weight), d(attn2.to_out[0].bias)
    Wkf, Wvf = (d(w) for w in adapter.weights(layer))
    n, context = d(n), d(context)
    heads = attn2.heads
    B, N_h, _ = n.shape
    h, w = hw
    inside = None
    if any(r is not None for r in regions):
        inside = [region_tokens_reference(r, h, w) if r is not None else np.zeros(h * w, bool) for r in regions]
    out = np.zeros((B, N_h, Wq.shape[0]))
    for b in range(B):
        Q = n[b] @ Wq.T                                    # Eq. 1
        K, V, owner = [context[b] @ Wk.T], [context[b] @ Wv.T], [np.full(context.shape[1], -1)]
        if cond_rows[b]:
            for i, ident in enumerate(identities):
                for h_f in ident.h_f:
                    hf = d(h_f[layer.name])
                    K.append(hf @ Wkf.T)                   # Eq. 2
                    V.append(weight * (hf @ Wvf.T))
                    owner.append(np.full(hf.shape[0], i))
        K, V, owner = np.concatenate(K), np.concatenate(V), np.concatenate(owner)   # Eqs. 3, 6
        M = np.zeros((N_h, K.shape[0]))
        if inside is not None:                             # Eq. 7
            for key in range(K.shape[0]):
                i = owner[key]
                if i < 0:
                    continue
                for j in range(len(identities)):
                    if j != i:
                        M[inside[j], key] = -np.inf
        dh = Q.shape[1] // heads
        for hd in range(heads):
            s = slice(hd * dh, (hd + 1) * dh)
            logits = M + (Q[:, s] @ K[:, s].T) / math.sqrt(dh)       # Eq. 4
            logits -= logits.max(axis=1, keepdims=True)
            S = np.exp(logits)
            S /= S.sum(axis=1, keepdims=True)
            out[b, :, s] = S @ V[:, s]                     # Eq. 5
    return out @ Wo.T + bo


def face(color, shift=0, size=64):
    """A flat cartoon face: a coloured oval with two eyes, shifted sideways."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), (200, 220, 240))
    d = ImageDraw.Draw(im)
    d.ellipse([14 + shift, 10, 50 + shift, 54], fill=color)
    d.ellipse([22 + shift, 24, 28 + shift, 30], fill="black")
    d.ellipse([36 + shift, 24, 42 + shift, 30], fill="black")
    return im


def make_face_dataset(root):
    """Two identity folders of two captioned 64 px faces each, one face mask each, and one unreadable file."""
    from PIL import Image, ImageDraw
    for who, color in (("ann", (230, 180, 150)), ("bob", (120, 80, 60))):
        (root / who).mkdir()
        for i in range(2):
            face(color, shift=4 * i).save(root / who / f"{who}{i}.png")
            (root / who / f"{who}{i}.txt").write_text(f"a photo of {who}, smiling" if i else f"a photo of {who}")
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).ellipse([14, 10, 50, 54], fill=255)
        mask.save(root / who / f"{who}0_mask.png")
    (root / "ann" / "broken.png").write_bytes(b"not a png")
    return root


def attn2_recorder():
    """ComfyUI's attn2_patch + attn2_output_patch recording, per layer key (block, number, index), what attn2 received
    as its query input ("n"), that layer's token grid ("hw") and attn2's output ("out").
    Returns (seen, patches): patches goes into transformer_options["patches"]."""
    seen = {}

    def grab_in(n, c, v, extra):
        seen[(extra["block"][0], extra["block"][1], extra["block_index"])] = {"n": n.clone(), "hw": extra["activations_shape"][-2:]}
        return n, c, v

    def grab_out(n, extra):
        seen[(extra["block"][0], extra["block"][1], extra["block_index"])]["out"] = n.clone()
        return n

    return seen, {"attn2_patch": [grab_in], "attn2_output_patch": [grab_out]}
