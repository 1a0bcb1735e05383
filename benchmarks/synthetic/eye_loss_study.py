"""Does weighing the eyes and mouth in the ADAPTER's loss carry eye colour? (issue 17) VALIDATION identities only.

probe_study.py (2026-12-07, shipped base and adapter) found the reference's eye colour partly in h_f at the 12 x 12
attn2 layers (held-out linear read-out R^2 0.71-0.73, against about 0.2 at the 6 x 6 layers), kept by Linear_vf
(V_f reads the same), and the generated picture's eye queries reading the reference's eye tokens 11x more than
attention blind to content at the last layer (output_3_0) but not at the first (input_1_0, 1.5x): of what an eye
query reads from the reference, about 11% is iris at best. The adapter's loss weighs every pixel of the face alike
(1 + the face mask), and the eyes are about 3% of a picture.

Arm: the shipped adapter recipe at `--steps` steps from scratch on the shipped base, with one change: the dataset's
masks are (face + k * eyes and mouth) / (1 + k) and face_loss_weight (1 + k) times the shipped 1, so a pixel weighs
1 + face + k * features (domain.feature_map: eye whites, irises, lips, mouth inside). The Trainer averages the mask
onto the 12 x 12 latent grid, so it is an eye's TOKEN that weighs more (1 + 1 + k x its features' share). k = 10 as in
base_study's features-scratch arm (about a quarter of the loss), not tried against others.
Control: the same recipe without the change (the base studies' 1500-step shipped control, cached).
Both adapters generate the same transfer cell (run.validation_cell: validation identities, one clean reference each,
two held-out captions, the same seeds) at the shipped defaults and at CFG 3 "text only", and pictures without an
adapter (same seeds) once per setting; probe_study's routing probe is run with each adapter.

Reading, written before it ran:
- Eye colour: the weighting carries eye colour if the eye dE (fit) of the arm's pictures is >= 3 below the control's
  at either setting (control at the shipped defaults, base studies: 29.4 with, 29.5 without the adapter).
- Decision rule (as every study): the weighting goes into the shipped recipe (a full `make synthetic`) only if its
  retrieval beats the control's by >= 2 paired SE at the shipped defaults, with its flat-region noise ratio no more
  than 0.1 above the control's.
(2026-12-07, 1298 s, training 559 s; docs/synthetic/studies/eye_loss_study.json: refuted. Eye dE 27.8 against
29.4 at the shipped defaults (without an adapter 29.5), 30.3 against 33.0 at CFG 3 text only (without 29.8);
retrieval 16.7% against 19.3% (-2.6 +- 2.3 paired) and 37.5% against 36.5% (+1.0 +- 3.8); noise ratio 1.10 against
1.02 and 1.88 against 1.53. The routing probe: eye queries' iris share at output_3_0 0.115 against the control's 0.044
(12x against 4.5x uniform): the weighting sharpened the routing, and eye colour still did not reach the pictures.)

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/eye_loss_study.py [--steps 1500] [--ids 96] [--features 10]
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


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "eye_loss_study.json", argv, ids=96, steps=1500,
        extra={"--features": dict(type=float, default=10.0, help="k: the eyes' and mouth's extra loss weight"),
               "--pairs": dict(type=int, default=128, help="routing probe pairs (probe_study.py)")})
    import domain as D
    import probe_study as P
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    t0 = time.time()
    train_ids = D.identities("training", s["train_ids"])
    scale, base_key = {**s, "adapter_steps": args.steps}, R.key(R.base_phases(s)[-1])
    adapters, info = {}, {}
    for name, k in (("control", 0.0), (f"features {args.features:g}", args.features)):
        path, info[name] = R.train_adapter(scale, args.work, patcher, clip, codec, train_ids, base_key, features=k)
        adapters[name] = IDFusionAdapter.load(path)
    trained = time.time() - t0
    ids, candidates, truths, (refs, _, captions, _) = R.validation_cell(args.ids, 2, 8_100)
    settings = {"shipped defaults": rec, "CFG 3 text only": {"cfg": 3.0, "uncond": "text only", "weight": 1.0}}
    control, arm = list(adapters)
    out = {"identities": args.ids, "pictures per cell": len(truths), "adapter steps": args.steps,
           "features": args.features, "training": info, "settings": settings}
    for label, setting in settings.items():
        hits, errs, hf = {}, {}, {}
        for name, adapter in {**adapters, "without adapter": None}.items():
            gen = R.Generator(patcher, clip, codec, adapter or shipped, s["eval_steps"], **setting)
            hits[name], errs[name], hf[name] = R.read_cell(gen, [[r] for r in refs], captions, 8_200, truths,
                                                           candidates, adapter is not None)
            R.log(f"{label}, {name}: retrieval {np.mean(hits[name]):.3f}, eyes {np.mean(errs[name]['eyes']):.1f}, "
                  f"flat-region energy {hf[name]:.2f}")
        out[label] = {**R.cell_figures(hits, errs, hf, adapters),
                      f"{arm} minus {control}": R.paired(hits[arm], hits[control])}
    out["routing"] = {}
    for name, adapter in adapters.items():
        gen = R.Generator(patcher, clip, codec, adapter, s["eval_steps"], **rec)
        out["routing"][name] = P.probe_routing(args, gen, lambda m, n=name: R.log(f"{n}: {m}"))
    out["seconds"] = {"training": round(trained), "total": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({label: {k: v for k, v in out[label].items() if k in ("retrieval", "noise ratio") or " minus " in k}
                      for label in settings}, indent=1))


if __name__ == "__main__":
    main()
