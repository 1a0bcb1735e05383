"""Does a change to the UNet adapter's training lift transfer? (issue 17) Measured on VALIDATION identities only.

The shipped adapter's train state (6000 steps at a constant LR) is continued `--steps` more steps per arm, each arm
with its TrainConfig overrides, from the same state, data order and seeds:
  more:         no overrides (the control: more steps alone);
  lr decay:     lr_decay_steps = --steps (the LR falls from 1e-3 to zero over the continuation);
  face weight:  face_loss_weight 4 (FaceSnap's Eq. 3 weight on the face mask, shipped 1);
  per step:     encoding per_step (h_f from the reference noised to the target's sigma at every step, in training and
                at sampling, instead of one clean pass); only with --arms (it was added after the first run).
Every arm, and the shipped adapter, generates the same transfer cell (validation identities, one clean reference
each, held-out captions, the same seeds) at two settings: the shipped adapter's recommended ones (CFG 2, uncond
"identity too") and CFG 3 "text only" (higher retrieval, but too much flat-region noise in the shipped sweep). The
instrument reads retrieval among 100 candidates and per-attribute errors, paired against the control; pictures
without the adapter, same seeds, give each error's ratio and the flat-region noise ratio's denominator.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/training_study.py [--steps 1500] [--ids 96] [--arms "per step"]
The control ("more") is always run; --arms names the others (default: lr decay and face weight 4, as first run).
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


FIRST_RUN = ("lr decay", "face weight 4")


def arms(steps: int, names=FIRST_RUN) -> dict:
    every = {"lr decay": {"lr_decay_steps": steps}, "face weight 4": {"face_loss_weight": 4.0},
             "per step": {"encoding": "per_step"}}
    unknown = set(names) - set(every)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from {sorted(every)}")
    return {"more": {}, **{n: every[n] for n in names}}


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "training_study.json", argv, ids=96, steps=1500,
        extra={"--arms": dict(default=",".join(FIRST_RUN), help="comma-separated arms besides the control")})
    chosen = arms(args.steps, [a.strip() for a in args.arms.split(",") if a.strip()])
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    t0 = time.time()
    base_key = R.key(R.base_phases(s)[-1])
    adapters = {"shipped": shipped}
    for name, overrides in chosen.items():
        adapters[name] = IDFusionAdapter.load(R.continue_adapter(s, args.work, patcher, clip, codec, base_key,
                                                                 args.steps, overrides, tag=name))
    trained = time.time() - t0
    ids, candidates, truths, (refs, _, captions, _) = R.validation_cell(args.ids, 2, 8_100)
    settings = {"shipped defaults": rec, "CFG 3 text only": {"cfg": 3.0, "uncond": "text only", "weight": 1.0}}
    out = {"identities": args.ids, "pictures per cell": len(truths), "steps past shipped": args.steps,
           "arms": chosen, "settings": settings, "seconds": {"training": round(trained)}}
    for label, setting in settings.items():
        hits, errs, hf = {}, {}, {}
        for name, adapter in {**adapters, "without adapter": None}.items():
            gen = R.Generator(patcher, clip, codec, adapter or shipped, s["eval_steps"], **setting)
            hits[name], errs[name], hf[name] = R.read_cell(gen, [[r] for r in refs], captions, 8_200, truths,
                                                           candidates, adapter is not None)
            R.log(f"{label}, {name}: retrieval {np.mean(hits[name]):.3f}, flat-region energy {hf[name]:.2f}")
        out[label] = {**R.cell_figures(hits, errs, hf, adapters),
                      "minus more": {a: R.paired(hits[a], hits["more"]) for a in adapters if a != "more"}}
    out["seconds"]["total"] = round(time.time() - t0)
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({label: {k: out[label][k] for k in ("retrieval", "minus more", "noise ratio")} for label in settings},
                     indent=1))


if __name__ == "__main__":
    main()
