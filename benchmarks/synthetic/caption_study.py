"""Does a base model whose cross-attention has learned to steer identity pass more of K_f/V_f into the picture?
(issue 17) Measured on VALIDATION identities only.

The pathway study found the transfer stops between h_f and the picture, not in matching: the shipped base's
cross-attention only ever carried the scene, because its captions never name the face. A real text-to-image base
has learned from captions like "red hair, broad face" to steer a face through those same keys and values. Here:
  scene only:  the shipped base (captions name the scene only);
  described:   the same recipe (pictures, steps, seeds) with `--describe` of the one-person captions also naming 1-3
               coarse features of the face (domain.described_caption: "ginger hair", "broad face", ...).
An adapter of `--steps` steps (the shipped recipe otherwise; its training captions are scene-only, as before) is
trained on each base from scratch, and both generate the same transfer cell (validation identities, one clean
reference each, held-out scene-only captions, the same seeds) at the shipped defaults and at CFG 3 "text only".
Without the adapter, each base must still draw a random identity from scene-only captions (retrieval near 1%).
A check that the described base learned its words: without the adapter, does a picture show the features its
caption names (the fitted identity's own descriptions contain the word), against the same seeds' scene-only
pictures?

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/caption_study.py [--steps 1500] [--describe 0.5] [--ids 96]
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


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "caption_study.json", argv, ids=96, steps=1500,
        extra={"--describe": dict(type=float, default=0.5, help="share of one-person base captions that describe the face")})
    describe = args.describe
    import domain as D
    import fit as F   # after open_study: the pack is loaded there
    from idfusion_pack.idfusion import synthetic
    t0 = time.time()
    described = {**s, "describe": describe}
    base_path = os.path.join(args.work, f"caption-study-base-{R.key(R.base_phases(described)[-1])}.safetensors")
    if not os.path.isfile(base_path):
        R.ship_base(base_path, *R.train_base(described, args.work, torch.device("cpu")))
    bases = {"scene only": (s, (patcher, clip, codec)), "described": (described, synthetic.load(base_path)[:3])}
    figures, adapters = R.compare_bases(args, s, rec, bases)
    out = {**figures, "describe": describe, "described base": os.path.basename(base_path)}
    settings = figures["settings"]
    ids, _, _, (_, _, captions, _) = R.validation_cell(args.ids, 2, 8_100)   # the cell compare_bases read
    # the described base's words: the same seeds with and without 1-3 descriptions appended to the caption
    p, c, k = bases["described"][1]
    gen = R.Generator(p, c, k, adapters["described"], s["eval_steps"], **settings["CFG 3 text only"])
    rng = np.random.default_rng(8_500)
    plain = [caps[0] for caps in captions]
    worded = [D.described_caption(cap, ident, rng) for cap, ident in zip(plain, ids)]
    appended = [w.split(", ")[len(p.split(", ")):] for w, p in zip(worded, plain)]   # each picture's named features
    named, agree = [w for ws in appended for w in ws], {}
    for cell, caps in (("with words", worded), ("scene only", plain)):
        reads = F.fit(R.generate(gen, [None] * len(caps), [[cap] for cap in caps], 8_600, with_identity=False))
        agree[cell] = [w in D.descriptors(r["identity"]) for ws, r in zip(appended, reads) for w in ws]
    out["described base follows its words"] = {
        cell: R.rate(a) for cell, a in agree.items()}
    # per attribute, paired on the same seeds: the word's noun (skin, hair, eyes, face, mouth, fringe; "darkeyed" and
    # "lighteyed" are eye colour)
    nouns = [w.split()[-1] if " " in w else "eye colour" for w in named]
    per = out["described base follows its words, per attribute"] = {}
    for n in sorted(set(nouns)):
        a, b = ([x for x, m in zip(agree[cell], nouns) if m == n] for cell in ("with words", "scene only"))
        per[n] = {"with words": float(np.mean(a)), "scene only": float(np.mean(b)), **R.paired(a, b)}
    out["described base follows its words"]["note"] = ("share of the caption's descriptions (words appended to a "
                                                       "scene caption) that the fitted picture's own descriptions "
                                                       "contain; 'scene only': the same seeds without the words")
    out["seconds"] = {"total": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({**{label: {k: out[label][k] for k in ("retrieval", "described minus scene only", "noise ratio")}
                         for label in settings}, "words": out["described base follows its words"]}, indent=1))


if __name__ == "__main__":
    main()
