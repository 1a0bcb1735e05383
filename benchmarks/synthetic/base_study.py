"""Does another base model carry more of the identity? (issue 17) Measured on VALIDATION identities only.

Every study so far put the limit in the base model: even from a perfect reference the adapter carries no eye colour,
eye spacing or mouth width, and the base's own img2img loses eye colour (calibration row 3). The shipped UNet folds
each 8 x 8 pixel patch (192 values) into a token and its first level has 64 channels: a third of the values a
token holds. Each arm is the shipped base's recipe (pictures, captions, steps, seeds) with one change:
  wide (`--arm wide`, output width_study.json): 128 channels at the first level too (128 / 128: 7.1 M parameters
            against 4.4 M, about twice the step time on this CPU);
  v (`--arm v`, output prediction_study.json, added after the wide arm lost): v-prediction instead of the x0 output.
            img2img_study.py found the shipped x0 base's output further from a clean picture than its own input at
            every noise level (its error has a floor: the network must redraw the whole picture through its
            channels), so even denoise 0.05 redraws the eyes and mouth; ComfyUI's v parametrisation returns
            x / (sigma^2 + 1) minus the network's share, a skip path that keeps the input where the noise is low.
            (An x0 output was chosen for the shipped base because v left grain after short training; the grain
            ratio with against without the identity is measured here too.)
against the shipped base (channels 64 / 128 over its two levels, x0 output). An adapter of `--steps` steps (the
shipped recipe otherwise) is trained on each base from scratch, and both generate the same transfer cell (run.compare_bases: validation identities, held-out captions, the same seeds) at the
shipped defaults and at CFG 3 "text only". Each base's own img2img (denoise 0.5) of validation drawings is read by
the instrument too: the ceiling that base sets for any adapter.

Decision rule, written before each run: the arm's base replaces the shipped one (in a full `make synthetic` run) only
if its adapter beats the shipped base's by >= 2 paired SE at the shipped defaults, with <= 3% retrieval without the
adapter.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/base_study.py --arm wide|v [--steps 1500] [--ids 96]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]


ARMS = {"wide": {"channels": 128, "mult": (1, 1)}, "v": {"pred": "v"}}
OUT = {"wide": "width_study.json", "v": "prediction_study.json"}


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "base_study.json", argv, ids=96, steps=1500,
        extra={"--arm": dict(choices=list(ARMS), required=True, help="the base's one change (see above)")})
    if os.path.basename(args.out) == "base_study.json":   # the default: each arm its own file
        args.out = os.path.join(os.path.dirname(args.out), OUT[args.arm])
    import domain as D
    from idfusion_pack.idfusion import synthetic
    t0 = time.time()
    changed = {**s, **ARMS[args.arm]}
    base_path = os.path.join(args.work, f"study-base-{R.key(R.base_phases(changed)[-1])}.safetensors")
    if not os.path.isfile(base_path):
        R.ship_base(base_path, *R.train_base(changed, args.work, torch.device("cpu")))
    bases = {"shipped": (s, (patcher, clip, codec)), args.arm: (changed, synthetic.load(base_path)[:3])}
    out, adapters = R.compare_bases(args, s, rec, bases)
    out[f"{args.arm} base"] = {"file": os.path.basename(base_path), "change": ARMS[args.arm],
                               "unet": R.base_settings(changed)["unet"]}
    out["parameters"] = {name: sum(t.numel() for t in p.model.diffusion_model.parameters())
                         for name, (_, (p, _, _)) in bases.items()}
    # each base's own img2img of known validation faces: what survives the base alone
    candidates = D.identities("candidates", 99)
    out["calibration"] = {}
    for name, (_, (p, c, k)) in bases.items():
        gen = R.Generator(p, c, k, adapters[name], s["eval_steps"])
        out["calibration"][name], _ = R.calibrate(gen, args.ids, 1, candidates, split="validation")
    out["seconds"] = {"total": round(time.time() - t0)}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    cal = "base model img2img, denoise 0.5"
    print(json.dumps({**{label: {k: v for k, v in out[label].items() if k in ("retrieval", "noise ratio") or " minus " in k}
                         for label in out["settings"]},
                      "img2img": {n: {k: out["calibration"][n][cal][k] for k in ("retrieval", "eyes", "eye_spacing", "mouth_w")}
                                  for n in bases}}, indent=1))


if __name__ == "__main__":
    main()
