"""Where does eye colour go in the base model's own img2img? (issue 17) Measured on VALIDATION identities only.

The calibration's third row (the base model's img2img of known faces at denoise 0.5) loses eye colour (ΔE about 25,
against 6 for skin), and no adapter so far carried eye colour either; width_study.py found a base with twice the
first-level width loses it just the same. Two readings: the base cannot draw the eyes' colour at all, or at denoise
0.5 the noise covers the few pixels of an eye and the base redraws them from its prior (which knows no identity).
Here the same known drawings go through each base's img2img at several denoise strengths: if eye colour is kept at
low denoise and lost by 0.5, the base draws eye colour but does not keep it through noise of that level.
Bases: the shipped one, and width_study's wide base when it is in --work.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/img2img_study.py [--ids 96] [--denoise 0.1 0.2 0.35 0.5]
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]


def main(argv=None):
    import run as R
    args, s, patcher, clip, codec, shipped, rec = R.open_study(
        __doc__, "img2img_study.json", argv, ids=96,
        extra={"--denoise": dict(type=float, nargs="+", default=[0.1, 0.2, 0.35, 0.5], help="img2img strengths")})
    import domain as D
    from idfusion_pack.idfusion import synthetic
    t0 = time.time()
    bases = {"shipped": (patcher, clip, codec)}
    for path in sorted(glob.glob(os.path.join(args.work, "width-study-base-*.safetensors"))):
        bases[os.path.basename(path)[len("width-study-base-"):-len(".safetensors")]] = synthetic.load(path)[:3]
    candidates = D.identities("candidates", 99)
    out = {"identities": args.ids, "bases": list(bases), "rows": {}}
    keep = ("retrieval", "skin", "hair", "eyes", "eye_spacing", "mouth_w", "face_w", "eye_size")
    for name, (p, c, k) in bases.items():
        gen = R.Generator(p, c, k, shipped, s["eval_steps"])   # the adapter is not used: img2img of the base alone
        for i, d in enumerate(args.denoise):
            cal, _ = R.calibrate(gen, args.ids, 1, candidates, split="validation", denoise=d)
            if i == 0:
                out["rows"]["clean drawings"] = {k: cal["clean drawings"][k] for k in keep}
            out["rows"][f"{name}, denoise {d}"] = {k: cal[f"base model img2img, denoise {d}"][k] for k in keep}
    out["seconds"] = round(time.time() - t0)
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    for row, v in out["rows"].items():
        print(f"{row:40s} " + "  ".join(f"{k} {v[k].get('mean', v[k].get('p')):.2f}" for k in keep))


if __name__ == "__main__":
    main()
