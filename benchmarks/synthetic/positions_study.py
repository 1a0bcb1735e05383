"""Where several references' keys sit in Flux's RoPE space, measured on VALIDATION identities (issue 17/19).

The shipped DiT adapter trained with one reference per row, its keys at time index t = -1. Eq. 6 at inference
concatenates more references; this compares two layouts for reference r of an identity:
  distinct: t = -(1 + r)   (each reference its own time slot)
  shared:   t = -1         (every reference where training put the one; attention over keys is a set, so
                            references at the same positions still all count, as in the UNet, whose K_f have none)
with three references in different poses against one (the facing-front one; both layouts put it at t = -1), same
captions and seeds. Validation identities only: the evaluation split is
measured once, by run.py, after the choice.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/positions_study.py [--ids 64]
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]


def layouts(original):
    def distinct(latent_sizes, patch_size, axes, pooled, device):
        out = []
        for r, hw in enumerate(latent_sizes):
            ids = original([hw], patch_size, axes, pooled, device)
            ids[:, 0] = -(1.0 + r)
            out.append(ids)
        return torch.cat(out)

    def shared(latent_sizes, patch_size, axes, pooled, device):
        out = []
        for hw in latent_sizes:
            ids = original([hw], patch_size, axes, pooled, device)
            ids[:, 0] = -1.0
            out.append(ids)
        return torch.cat(out)
    return {"distinct": distinct, "shared": shared}


def main(argv=None):
    import run as R
    args, _, patcher, clip, codec, adapter, rec = R.open_study(__doc__, "positions_study.json", argv, ids=64, scale="flux-cpu")
    import domain as D   # after open_study: the pack is loaded there
    import fit as F
    from idfusion_pack.idfusion import patch_flux
    gen = R.Generator(patcher, clip, codec, adapter, R.SCALES["flux-cpu"]["eval_steps"], **rec)
    per = 2
    ids, candidates, truths, (_, _, captions, _) = R.validation_cell(args.ids, per, 7_000)
    r5 = np.random.default_rng(14_500)
    three = [R.reference_drawings([i] * 3, r5, [{**D.random_scene(r5), "pose": p} for p in D.POSES])[0] for i in ids]
    original = patch_flux.reference_positions
    hits = {}
    t0 = time.time()
    try:
        for name, fn in layouts(original).items():
            patch_flux.reference_positions = fn
            hits[f"three, {name}"] = R.retrieval_hits(F.fit(R.generate(gen, three, captions, 57_000)), truths, candidates)
            R.log(f"three references, {name}: {np.mean(hits[f'three, {name}']):.3f}")
    finally:
        patch_flux.reference_positions = original
    # one reference: both layouts put it at t = -1, so it is sampled once
    hits["one"] = R.retrieval_hits(F.fit(R.generate(gen, [[t[1]] for t in three], captions, 57_000)), truths, candidates)
    R.log(f"one reference: {np.mean(hits['one']):.3f}")
    out = {"identities": args.ids, "pictures": len(truths), "settings": {"cfg": gen.cfg, "uncond": gen.uncond,
           "weight": gen.weight}, "rates": {k: R.rate(v) for k, v in hits.items()},
           "three minus one": {n: R.paired(hits[f"three, {n}"], hits["one"]) for n in ("distinct", "shared")},
           "shared minus distinct, three": R.paired(hits["three, shared"], hits["three, distinct"]),
           "seconds": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
