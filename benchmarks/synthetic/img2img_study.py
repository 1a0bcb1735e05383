"""Where does eye colour go in the base model's own img2img? (issue 17) Measured on VALIDATION identities only.

The calibration's third row (the base model's img2img of known faces at denoise 0.5) loses eye colour (ΔE about 25,
against 6 for skin), and no adapter so far carried eye colour either; base_study.py --arm wide found a base with
twice the first-level width loses it just the same. Two readings: the base cannot draw the eyes' colour at all, or at denoise
0.5 the noise covers the few pixels of an eye and the base redraws them from its prior (which knows no identity).
Here the same known drawings go through each base's img2img at several denoise strengths: if eye colour is kept at
low denoise and lost by 0.5, the base draws eye colour but does not keep it through noise of that level.
Also each base's denoiser error at fixed noise levels (one network call on drawings noised to sigma, no sampler):
RMS of its output minus the clean picture, against RMS of its input minus the clean picture.
Bases: the shipped one, and every base base_study.py trained in --work (named by its cache key).

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/img2img_study.py [--ids 96] [--denoise 0.1 0.2 0.35 0.5]
        [--bases KEY ...]   (only these study bases besides the shipped one)
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "img2img_study.json", argv, ids=96,
        extra={"--denoise": dict(type=float, nargs="+", default=[0.1, 0.2, 0.35, 0.5], help="img2img strengths"),
               "--bases": dict(nargs="+", metavar="KEY", help="only these study bases (cache keys, as in "
                               "study-base-KEY.safetensors) besides the shipped one; default: every one in --work")})
    import domain as D
    from idfusion_pack.idfusion import synthetic
    t0 = time.time()
    bases = {"shipped": (patcher, clip, codec)}
    for path in sorted(glob.glob(os.path.join(args.work, "study-base-*.safetensors"))):
        name = os.path.basename(path)[len("study-base-"):-len(".safetensors")]
        if args.bases is None or name in args.bases:
            bases[name] = synthetic.load(path)[:3]
    missing = set(args.bases or ()) - set(bases)
    if missing:
        raise SystemExit(f"--bases: no study-base-KEY.safetensors in {args.work} for {sorted(missing)}; "
                         "train it first (base_study.py --arm ... --base-only prints its path)")
    candidates = D.identities("candidates", 99)
    out = {"identities": args.ids, "bases": list(bases), "rows": {}}
    keep = ("retrieval", "skin", "hair", "eyes", "eyes, iris pixels", "eye_spacing", "mouth_w", "face_w", "eye_size")
    # the denoiser's own error at a fixed noise level, one call, no sampler: RMS of (output - clean picture) against
    # RMS of (input - clean picture); a denoiser that passes a nearly clean input through has the first below the second
    rng = np.random.default_rng(9_000)
    ids = D.identities("validation", args.ids)
    clean = D.render_batch([[i] for i in ids], [D.random_scene_from(rng, held_out=True) for _ in ids],
                           rng.uniform(-D.JITTER, D.JITTER, (len(ids), 1, 2)))[0]
    out["denoiser error"] = {}
    for name, (p, c, k) in bases.items():
        x0 = D.to_latent(clean.float(), k.factor)   # RMS in the model's pixels, whatever its token
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9_001))
        gen = R.Generator(p, c, k, shipped, s["eval_steps"])   # the adapter is not used: the base alone
        cal, _ = R.calibrate(gen, args.ids, 1, candidates, split="validation", denoise=args.denoise)
        out["rows"]["clean drawings"] = {k: cal["clean drawings"][k] for k in keep}   # the same for every base
        for d in args.denoise:
            out["rows"][f"{name}, denoise {d}"] = {k: cal[f"base model img2img, denoise {d}"][k] for k in keep}
        ctx, m = gen.encode_text([""]), p.model
        with torch.inference_mode():
            for sig in (0.03, 0.1, 0.3, 1.0, 3.0):
                sigma = torch.full((len(ids),), sig)
                xt = m.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
                d = torch.cat([m.apply_model(xt[i:i + 32], sigma[i:i + 32], c_crossattn=ctx.expand(len(xt[i:i + 32]), -1, -1))
                               for i in range(0, len(ids), 32)])
                out["denoiser error"][f"{name}, sigma {sig}"] = {
                    "output": float((d - x0).square().mean().sqrt()), "input": float((xt - x0).square().mean().sqrt())}
    out["seconds"] = round(time.time() - t0)
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    for row, v in out["rows"].items():
        print(f"{row:40s} " + "  ".join(f"{k} {v[k].get('mean', v[k].get('p')):.2f}" for k in keep))
    for row, v in out["denoiser error"].items():
        print(f"{row:40s} RMS output - clean {v['output']:.4f}, input - clean {v['input']:.4f}")


if __name__ == "__main__":
    main()
