"""Where is the reference's eye colour lost? (issue 17) Two probes of the SHIPPED base and adapter, no training,
VALIDATION identities only.

Every study so far found the adapter's pictures carry next to no eye colour (eye dE 26.8-35.8 with the adapter against
27.6-34.7 without it), whatever base it ran on, while skin and hair colour are copied. The colour can be lost in three
places: (1) the reference pass (h_f at the attn2 layers no longer holds it), (2) the adapter's Linear_vf (V_f drops
it), (3) the attention (the generated picture's eye queries do not read the reference's eye tokens).

Probe 1, content (places 1 and 2): a linear read-out (ridge, penalty chosen by 5-fold cross-validation on the training
part only) of a colour (CIELAB) from the reference's tokens at that colour's pixels (the token grid's share of the
colour's coverage as weights), fitted on 3/4 of the references and scored on the other 1/4: held-out R^2 (mean of
L, a, b) and dE of the prediction. Sources: the reference's input latent tokens (what the pass sees: the upper bound),
h_f at every attn2 layer, and V_f = Linear_vf(h_f) of the shipped adapter. Controls: skin and hair colour read the same
way (they transfer), eye colour read from the mean of all tokens, and eye colour read from the eye tokens against
shuffled targets (must give R^2 <= 0).

Probe 2, routing (place 3): the shipped adapter applied with a reference of an identity; the denoiser run (one call, no
sampler) on a drawing of the same identity in another scene, noised to sigma, captioned with that scene. At each attn2
layer, for the queries at that drawing's iris pixels (weighted by their iris share), the softmax over text and
reference keys is read: `reference mass` = attention on all reference keys, `iris share` = the reference-weighted mean
iris coverage of the reference tokens attended (1 = reading iris only), against `uniform` (the mean iris coverage of
the reference's tokens: what attention blind to content reads). The same for skin queries and skin coverage.

Written before either probe ran (the reading, decided in advance):
- Probe 1. "Present" if the best h_f layer's held-out R^2 for eye colour is >= 0.8 while the input tokens give
  >= 0.9; "lost in the pass" if every h_f layer gives <= 0.5. If h_f holds it (>= 0.8) but V_f at the same layer gives
  <= 0.5, Linear_vf drops it.
- Probe 2. "Routes" if eye queries' iris share is >= 3x uniform at the layers where probe 1 finds eye colour, averaged
  over the sigmas; "does not route" if <= 1.5x.
- Next, by outcome: lost in the pass -> the identity needs tokens from earlier in the UNet (or the input latent);
  dropped by Linear_vf or not routed -> weigh the eyes in the adapter's loss (domain.feature_map) or give the adapter
  position keys; present and routed -> the loss is downstream of attention (the base redraws eyes, as its img2img).
  (2026-12-07, 66 s; docs/synthetic/studies/probe_study.json: neither "present" nor "lost". Eye colour R^2 0.73 at
  input_1_0, 0.62 / 0.71 at output_2_0 / output_3_0 (the 12 x 12 layers), 0.19-0.23 at the 6 x 6 ones; V_f within
  0.03 of h_f everywhere; skin and hair 0.90-0.98; shuffled <= 0. The calibration missed its bar: the input tokens
  give 0.54, so the read-out is a lower bound. Routing: eye queries read 1.2-1.8x uniform at input_1_0, 4.7-6.7x at
  output_2_0, 10.7-11.6x (iris share 0.11; 0.34 if attention followed iris coverage) at output_3_0: routed at the
  output layers only.)

Probe 3, past the attention (`--part output`, added after probes 1-2 and eye_loss_study.py ran, written before it
ran): probes 1-2 found eye colour partly in h_f and V_f at the 12 x 12 layers and eye queries reading 11% iris at
output_3_0, and eye_loss_study found that weighing the eyes in the adapter's loss doubled that share (its 1500-step
adapter 0.115 against 0.044) without bringing eye colour into the pictures. Does the colour reach the eye queries'
attention output? As probe 2 (same pairs' recipe, `--pairs` of them) at sigma 3 and 1, the reference's share of each
layer's attention output (sum over heads of the softmax over reference keys times V_f) at the target's iris queries
(weighted by iris share) is read out linearly (ridge as probe 1, 3/4 fit, 1/4 scored) for the identity's eye colour.
Controls: the same read-out from the layer's queries q at the iris (the target itself: what its noised pixels still
show), and skin colour from the same outputs at skin queries. Reading: "carried past the attention" if held-out R^2
>= 0.5 at output_3_0 at sigma 3 while the queries give <= 0.2 there: then the frozen layers after attn2 do not turn
it into iris pixels, and the next lever is outside the adapter's two linears; "diluted" if <= 0.2.
(2026-12-07, 512 pairs, 59 s; docs/synthetic/studies/probe_output_study.json: between the two. At output_3_0 the
reference read gives eye colour R^2 0.45 at sigma 3 (queries 0.17) and 0.49 at sigma 1 (queries 0.42, which at the
last layer include what earlier fused layers added); every other layer <= 0.14. Skin from the reference read 0.94-0.96
at output_3_0. Half the eye colour's variance reaches the last layer's eye queries, and none of it the picture.)

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/probe_study.py [--ids 1024] [--pairs 128] [--threads 2]
    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/probe_study.py --part output --pairs 512 [--threads 2]
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]

SIGMAS = (0.2, 1.0, 3.0)
PENALTIES = np.logspace(-3, 4, 15)


def token_weights(cover: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Coverage maps (B, H, W) in [0, 1] -> each token's share of its cell covered (B, h*w) on the h x w grid with
    n_tokens cells (the UNet halves a square grid, ceil, per level)."""
    h, w = cover.shape[-2:]
    h, w = h // 8, w // 8            # the latent grid: 8x8 pixels per token
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not lie on a grid halved from the latent's")
    return torch.nn.functional.adaptive_avg_pool2d(cover[:, None].float(), (h, w)).flatten(1)


def pooled(tokens: torch.Tensor, cover: torch.Tensor) -> np.ndarray:
    """tokens (B, N, C), coverage (B, H, W) -> the coverage-weighted mean token (B, C)."""
    w = token_weights(cover, tokens.shape[1])
    w = w / w.sum(1, keepdim=True).clamp(min=1e-8)
    return torch.einsum("bn,bnc->bc", w, tokens.float()).numpy().astype(np.float64)


def ridge_readout(X: np.ndarray, Y: np.ndarray, n_train: int, shuffle_seed: int | None = None) -> dict:
    """Held-out linear read-out of Y (B, 3 Lab) from X (B, C): ridge on standardised X, the penalty chosen by 5-fold
    CV on the first n_train rows only. -> R^2 (mean over L, a, b) and dE on the rest, and the penalty."""
    import domain as D
    if shuffle_seed is not None:   # control: targets that have nothing to do with the tokens
        Y = Y[np.random.default_rng(shuffle_seed).permutation(len(Y))]
    Xtr, Ytr, Xte, Yte = X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]

    def fit(Xa, Ya, lam):
        mu, sd = Xa.mean(0), Xa.std(0) + 1e-8
        ym = Ya.mean(0)
        Z = (Xa - mu) / sd
        B = np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ (Ya - ym))
        return lambda Xb: ((Xb - mu) / sd) @ B + ym

    folds = np.array_split(np.arange(n_train), 5)
    cv = []
    for lam in PENALTIES:
        err = 0.0
        for f in folds:
            keep = np.setdiff1d(np.arange(n_train), f)
            err += float(((fit(Xtr[keep], Ytr[keep], lam)(Xtr[f]) - Ytr[f]) ** 2).sum())
        cv.append(err)
    lam = float(PENALTIES[int(np.argmin(cv))])
    pred = fit(Xtr, Ytr, lam)(Xte)
    r2 = 1 - ((pred - Yte) ** 2).sum(0) / ((Yte - Ytr.mean(0)) ** 2).sum(0)
    dE = D.delta_e(pred, Yte)
    return {"r2": float(r2.mean()), "r2_Lab": [round(float(x), 3) for x in r2], "dE": float(dE.mean()),
            "dE_se": float(dE.std(ddof=1) / math.sqrt(len(dE))), "dE_predict_mean": float(D.delta_e(
                np.broadcast_to(Ytr.mean(0), Yte.shape), Yte).mean()), "penalty": lam, "n_test": len(Yte)}


def probe_content(args, gen, shipped, log):
    import domain as D
    import run as R
    rng = np.random.default_rng(11_000)
    ids = D.identities("validation", args.ids)
    jitter = rng.uniform(-D.JITTER, D.JITTER, (len(ids), 1, 2))
    drawings, scenes = R.reference_drawings(ids, rng, jitter=jitter)
    faces = [[i] for i in ids]
    covers = {c: D.feature_map(faces, scenes, jitter, keys=(c,)) for c in ("eyes", "skin", "hair")}
    truth = {c: np.stack([i[c] for i in ids]) for c in ("eyes", "skin", "hair")}
    h_f, latents = {}, []
    for i in range(0, len(ids), 32):
        ident = gen.identity(list(drawings[i:i + 32]))
        for layer in shipped.layers:
            h_f.setdefault(layer.name, []).extend(h[layer.name] for h in ident.h_f)
        latents.extend(ident.latents)
    log(f"probe 1: {len(ids)} references encoded")
    lat = torch.cat(latents).flatten(2).transpose(1, 2)     # (B, h*w, C): the input tokens
    sources = {"input latent": lat}
    for layer in shipped.layers:
        hf = torch.stack(h_f[layer.name])
        sources[f"h_f {layer.name}"] = hf
        sources[f"V_f {layer.name}"] = hf @ shipped.weights(layer)[1].detach().float().t()
    n_train = len(ids) * 3 // 4
    out = {"references": len(ids), "train": n_train, "layers": {l.name: list(l.key) + [l.channels] for l in shipped.layers},
           "rows": {}}
    with torch.no_grad():
        for name, tok in sources.items():
            row = {c: ridge_readout(pooled(tok, covers[c]), truth[c], n_train) for c in ("eyes", "skin", "hair")}
            row["eyes from all tokens"] = ridge_readout(tok.float().mean(1).numpy().astype(np.float64), truth["eyes"], n_train)
            row["eyes, shuffled targets"] = ridge_readout(pooled(tok, covers["eyes"]), truth["eyes"], n_train, shuffle_seed=7)
            out["rows"][name] = row
            log(f"probe 1, {name} ({tok.shape[1]} tokens x {tok.shape[2]}): R^2 eyes {row['eyes']['r2']:.3f} "
                f"(dE {row['eyes']['dE']:.1f}), skin {row['skin']['r2']:.3f}, hair {row['hair']['r2']:.3f}, "
                f"eyes from all tokens {row['eyes from all tokens']['r2']:.3f}, shuffled {row['eyes, shuffled targets']['r2']:.3f}")
    return out


class _Reader:
    """attn2 replace that wraps the pack's patch on a layer (chained: its output is the pack's) and records, for the
    queries, the softmax over [text keys; reference keys] averaged over heads. Measuring only: never shipped."""

    def __init__(self, inner, store, outputs=False):
        self.inner, self.store, self.outputs = inner, store, outputs

    def __call__(self, q, k, v, extra_options):
        out = self.inner(q, k, v, extra_options)
        f = self.inner.fusions[0]
        K_f, V_f = f.kv(self.inner.layer, q.device, q.dtype, None)[0]
        heads = extra_options["n_heads"]
        b, n, d = q.shape
        K = torch.cat([k, K_f[None].expand(b, -1, -1)], 1)
        qh = q.reshape(b, n, heads, d // heads).transpose(1, 2)
        kh = K.reshape(b, K.shape[1], heads, d // heads).transpose(1, 2)
        p = torch.softmax(qh.float() @ kh.float().transpose(-1, -2) / math.sqrt(d // heads), -1)
        if self.outputs:   # probe 3: the reference keys' share of the attention output, and the queries
            vh = V_f.float().reshape(1, -1, heads, d // heads).transpose(1, 2)             # (1, heads, N_f, dh)
            ref = (p[..., k.shape[1]:] @ vh).transpose(1, 2).reshape(b, n, d)          # (b, N_h, D)
            self.store[self.inner.layer.name] = (ref, q.float(), n)
            return out
        self.store[self.inner.layer.name] = (p.mean(1)[:, :, k.shape[1]:], n)     # (b, N_h, N_f) reference part
        return out

    def __deepcopy__(self, memo):
        return self


def pairs(n: int, seed: int, factor: int):
    """Probes 2 and 3: n validation identities, each with a reference drawing in a random scene and a target drawing of
    the same identity in a held-out scene that differs in expression, pose and background.
    -> (identities, references, reference scenes and jitter, target scenes and jitter, target latents, noise)."""
    import domain as D
    import run as R
    rng = np.random.default_rng(seed)
    ids = D.identities("validation", n)
    jr = rng.uniform(-D.JITTER, D.JITTER, (len(ids), 1, 2))
    refs, ref_scenes = R.reference_drawings(ids, rng, jitter=jr)
    scenes = [D.random_scene_from(rng, held_out=True, **{k: ("not", rs[k]) for k in D.SCENE_ATTRS}) for rs in ref_scenes]
    jt = rng.uniform(-D.JITTER, D.JITTER, (len(ids), 1, 2))
    x0 = D.to_latent(D.render_batch([[i] for i in ids], scenes, jt)[0].float(), factor)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    return ids, refs, (ref_scenes, jr), (scenes, jt), x0, noise


def read_denoiser(gen, ref, caption, xt_of, sigmas, outputs=False):
    """The shipped Apply with one reference, every attn2 patch wrapped in a _Reader, the denoiser once per sigma on
    xt_of(sigma) -> yields (sigma, {layer name: what the readers recorded})."""
    model = gen.apply(gen.identity([ref])).clone()
    store = {}
    for key, patch in list(model.model_options["transformer_options"]["patches_replace"]["attn2"].items()):
        model.set_model_attn2_replace(_Reader(patch, store, outputs), *key)
    ctx = gen.encode_text([caption])
    for sig in sigmas:
        sigma = torch.full((1,), sig)
        with torch.inference_mode():
            gen.patcher.model.apply_model(xt_of(sigma), sigma, c_crossattn=ctx,
                                          transformer_options=model.model_options["transformer_options"])
        yield sig, store


def probe_routing(args, gen, log):
    import domain as D
    import run as R
    ids, refs, (ref_scenes, jr), (scenes, jt), x0, noise = pairs(args.pairs, 12_000, gen.codec.factor)
    faces = [[i] for i in ids]
    cov_ref = {c: D.feature_map(faces, ref_scenes, jr, keys=(c,)) for c in ("eyes", "skin")}
    cov_tgt = {c: D.feature_map(faces, scenes, jt, keys=(c,)) for c in ("eyes", "skin")}
    ms = gen.patcher.model.model_sampling
    acc = {}   # (sigma, layer, colour) -> [iris share, uniform, reference mass] per pair
    for i in range(len(ids)):
        xt_of = lambda sigma: ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise[i:i + 1], x0[i:i + 1])   # noqa: E731
        for sig, store in read_denoiser(gen, refs[i], D.caption(scenes[i]), xt_of, SIGMAS):
            for name, (p, n_h) in store.items():
                for c in ("eyes", "skin"):
                    wq = token_weights(cov_tgt[c][i:i + 1], n_h)[0]
                    ck = token_weights(cov_ref[c][i:i + 1], p.shape[-1])[0]
                    if float(wq.sum()) == 0:
                        continue
                    wq = wq / wq.sum()
                    pr = p[0]                                   # (N_h, N_f)
                    mass = pr.sum(-1)                            # reference mass per query
                    share = (pr @ ck) / mass.clamp(min=1e-12)    # attended iris (skin) coverage per query
                    acc.setdefault((sig, name, c), []).append(
                        [float(wq @ share), float(ck.mean()), float(wq @ mass)])
        if (i + 1) % 32 == 0:
            log(f"probe 2: {i + 1}/{len(ids)} pairs")
    out = {"pairs": len(ids), "sigmas": list(SIGMAS), "rows": {}}
    for (sig, name, c), v in sorted(acc.items()):
        a = np.array(v)
        out["rows"][f"sigma {sig}, {name}, {c}"] = {
            "share": R.mean_se(a[:, 0]), "uniform": float(a[:, 1].mean()), "lift": float(a[:, 0].mean() / a[:, 1].mean()),
            "reference mass": R.mean_se(a[:, 2])}
    for (sig, name, c), v in sorted(acc.items()):
        r = out["rows"][f"sigma {sig}, {name}, {c}"]
        log(f"probe 2, sigma {sig}, {name}, {c} queries: share {r['share']['mean']:.3f} against uniform "
            f"{r['uniform']:.3f} (x{r['lift']:.1f}), reference mass {r['reference mass']['mean']:.3f}")
    return out


def probe_output(args, gen, log, sigmas=(3.0, 1.0)):
    """Probe 3: is the identity's eye colour linearly in the eye queries' reference read (see the description)?"""
    import domain as D
    ids, refs, _, (scenes, jt), x0, noise = pairs(args.pairs, 13_000, gen.codec.factor)
    cov = {c: D.feature_map([[i] for i in ids], scenes, jt, keys=(c,)) for c in ("eyes", "skin")}
    truth = {c: np.stack([i[c] for i in ids]) for c in ("eyes", "skin")}
    ms = gen.patcher.model.model_sampling
    feats = {}   # (sigma, layer, "reference read" | "queries", colour) -> [pooled vector per pair]
    for i in range(len(ids)):
        xt_of = lambda sigma: ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise[i:i + 1], x0[i:i + 1])   # noqa: E731
        for sig, store in read_denoiser(gen, refs[i], D.caption(scenes[i]), xt_of, sigmas, outputs=True):
            for name, (ref, q, n) in store.items():
                for c in ("eyes", "skin"):
                    for what, tok in (("reference read", ref), ("queries", q)):
                        feats.setdefault((sig, name, what, c), []).append(pooled(tok, cov[c][i:i + 1])[0])
        if (i + 1) % 64 == 0:
            log(f"probe 3: {i + 1}/{len(ids)} pairs")
    n_train = len(ids) * 3 // 4
    out = {"pairs": len(ids), "train": n_train, "sigmas": list(sigmas), "rows": {}}
    for (sig, name, what, c), v in feats.items():
        r = ridge_readout(np.stack(v), truth[c], n_train)
        out["rows"][f"sigma {sig}, {name}, {what}, {c}"] = r
        log(f"probe 3, sigma {sig}, {name}, {what}, {c}: R^2 {r['r2']:.3f} (dE {r['dE']:.1f} against {r['dE_predict_mean']:.1f})")
    return out


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "probe_study.json", argv, ids=1024,
        extra={"--pairs": dict(type=int, default=128, help="probes 2 and 3: reference/target pairs (validation identities)"),
               "--part": dict(choices=["content", "output"], default="content",
                              help="content: probes 1 and 2 (probe_study.json); output: probe 3 (--out to name its file)")})
    if args.part == "output" and os.path.basename(args.out) == "probe_study.json":
        args.out = os.path.join(os.path.dirname(args.out), "probe_output_study.json")
    t0 = time.time()
    gen = R.Generator(patcher, clip, codec, shipped, s["eval_steps"], **rec)
    if args.part == "output":
        out = {"settings": rec, "output": probe_output(args, gen, R.log)}
    else:
        out = {"settings": rec, "content": probe_content(args, gen, shipped, R.log),
               "routing": probe_routing(args, gen, R.log)}
    out["seconds"] = round(time.time() - t0)
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    R.log(f"wrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
