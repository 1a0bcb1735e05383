"""Why does the UNet adapter carry colours but hardly any geometry? (issue 17) VALIDATION identities only.

The shipped base and adapter at their recommended settings, one picture per caption, each with its own seed:
  other scene:    the transfer cell's reference (a random scene and position in the training range);
  caption's scene: the same identity drawn in exactly the scene the caption asks for, centred: the reference is
                   then the ideal output itself, so what still fails to come through cannot be blamed on matching
                   a face across expressions, poses and positions, only on the path from K_f/V_f into the picture;
  without:        no identity (each error's denominator).
Read by the calibrated renderer fit: retrieval among 100 candidates and each attribute's error ratio to without.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/pathway_study.py [--ids 96]
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
    args, s, patcher, clip, codec, shipped, rec = R.open_study(__doc__, "pathway_study.json", argv, ids=96)
    import fit as F   # after open_study: the pack is loaded there
    t0 = time.time()
    gen = R.Generator(patcher, clip, codec, shipped, s["eval_steps"], **rec)
    ids, candidates, truths, (refs, _, captions, cap_scenes) = R.validation_cell(args.ids, 2, 8_100)
    per_picture = [[c] for caps in captions for c in caps]
    other = [[r] for r in refs for _ in range(2)]
    same, _ = R.reference_drawings(truths, np.random.default_rng(8_300), scenes=cap_scenes,
                                   jitter=np.zeros((len(truths), 1, 2)))
    cells = {"other scene": other, "caption's scene": [[r] for r in same], "without": None}
    hits, errs = {}, {}
    for name, cell_refs in cells.items():
        pics = R.generate(gen, cell_refs or other, per_picture, 8_400, with_identity=cell_refs is not None)
        reads = F.fit(pics)
        hits[name], errs[name] = R.retrieval_hits(reads, truths, candidates), R.errors(reads, truths)
        R.log(f"{name}: retrieval {np.mean(hits[name]):.3f}")
    ideal = F.fit(torch.from_numpy(same).permute(0, 3, 1, 2).float() / 127.5 - 1)   # the instrument on the ideal output
    attrs = list(errs["without"])
    out = {"identities": args.ids, "pictures per cell": len(truths),
           "settings": {"cfg": gen.cfg, "uncond": gen.uncond, "weight": gen.weight},
           "retrieval": {c: R.rate(h) for c, h in hits.items()},
           "retrieval of the caption's-scene references themselves": R.rate(R.retrieval_hits(ideal, truths, candidates)),
           "caption's scene minus other scene": R.paired(hits["caption's scene"], hits["other scene"]),
           "error": {c: {k: R.mean_se(e[k]) for k in attrs} for c, e in errs.items()},
           "error ratio to without": {c: {k: float(np.mean(e[k]) / np.mean(errs["without"][k])) for k in attrs}
                                      for c, e in errs.items() if c != "without"},
           "seconds": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("retrieval", "caption's scene minus other scene", "error ratio to without")},
                     indent=1))


if __name__ == "__main__":
    main()
