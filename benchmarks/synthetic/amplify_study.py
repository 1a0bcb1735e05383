"""Does amplifying the identity where the eye queries read the reference's eyes bring eye colour into the pictures?
(issue 17) The shipped base and adapter; VALIDATION identities only.

probe_study.py (2026-12-07) found that at the two output attn2 layers on the latent's own 12 x 12 grid the generated
eye queries read the reference's eye tokens 5-12x more than content-blind attention, and that at the last one about
half the eye colour's variance is in what they read (held-out R^2 0.45-0.49), yet the pictures show none of it (eye
dE 29.4 with the adapter, 29.5 without). Apply's per-block weights scale V_f at chosen layers (the keys, so where the
queries look, stay as they are): if the colour read there is too weak for the frozen layers after it, a larger V_f at
those layers alone should show it. The layers are read off the adapter: the output group's layers with the fewest
channels (the highest resolution). Arms: those layers at 2x and 4x the weight, every other layer 1; control: the
shipped defaults (every layer 1); and pictures without the adapter. The same transfer cell and seeds as the other
studies (run.validation_cell, 192 pictures), at the shipped defaults.

Reading, written before it ran: amplifying carries eye colour if an arm's eye dE (fit) is >= 3 below the control's;
a per-block default is proposed only if that arm also keeps retrieval within 2 paired SE of the control's (or above)
and its flat-region noise ratio no more than 0.1 above the control's.
(2026-12-07, 393 s; docs/synthetic/studies/amplify_study.json: refuted. Eye dE 27.4 at x2 and 28.6 at x4 against
27.7 (without the adapter 29.5). Retrieval rose, through skin and hair: 34.4% and 37.0% against 27.6% (+6.8 +- 2.6
and +9.4 +- 3.5 paired), but the noise ratio went to 1.21 and 1.65 against 1.04: no default proposed.)

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/amplify_study.py [--ids 96] [--threads 2]
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]

FACTORS = (2.0, 4.0)


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(__doc__, "amplify_study.json", argv, ids=96)
    t0 = time.time()
    narrowest = min(l.channels for l in shipped.layers)
    chosen = [i for i, l in enumerate(shipped.layers) if l.key[0] == "output" and l.channels == narrowest]
    arms = {"control": ""}
    arms.update({f"x{f:g} at {[shipped.layers[i].name for i in chosen]}": ", ".join(f"{i}:{f:g}" for i in chosen)
                 for f in FACTORS})
    ids, candidates, truths, (refs, _, captions, _) = R.validation_cell(args.ids, 2, 8_100)
    hits, errs, hf = {}, {}, {}
    for name, block_weights in {**arms, "without adapter": None}.items():
        gen = R.Generator(patcher, clip, codec, shipped, s["eval_steps"], **rec)
        gen.block_weights = block_weights or ""
        hits[name], errs[name], hf[name] = R.read_cell(gen, [[r] for r in refs], captions, 8_200, truths, candidates,
                                                       block_weights is not None)
        R.log(f"{name} ({block_weights!r}): retrieval {np.mean(hits[name]):.3f}, eyes {np.mean(errs[name]['eyes']):.1f}, "
              f"flat-region energy {hf[name]:.2f}")
    attrs = list(errs["control"])
    out = {"identities": args.ids, "pictures per cell": len(truths), "settings": rec, "block weights": arms,
           "retrieval": {a: R.rate(h) for a, h in hits.items()},
           "minus control": {a: R.paired(hits[a], hits["control"]) for a in arms if a != "control"},
           "noise ratio": {a: hf[a] / hf["without adapter"] for a in arms},
           "error": {a: {k: R.mean_se(e[k]) for k in attrs} for a, e in errs.items()},
           "seconds": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("retrieval", "minus control", "noise ratio")}, indent=1))


if __name__ == "__main__":
    main()
