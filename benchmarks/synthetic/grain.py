"""Why the old synthetic base model was grainy: the same base training with a v-prediction and an x0-prediction
parametrisation, at the same step budget, everything else equal (data, seed, loss weighting, sampler).

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/grain.py [--steps 600] [--classifier models/classifier/...]

Prints, per parametrisation, the grain (Laplacian energy of 128 base samples over that of drawn faces of the same
scenes: 1 = as clean as a drawing) and how often the shipped classifier reads the caption's expression, pose and
background in the samples. Results are also written as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic", "grain"))
    ap.add_argument("--classifier", default=os.path.join(ROOT, "models", "classifier", "synthetic_faces_classifier.safetensors"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "synthetic", "grain.json"))
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    args = ap.parse_args(argv)
    import torch
    from train import load_pack
    load_pack(args.comfyui, cpu=True)
    from safetensors.torch import load_file
    import domain as D
    import run as R
    from idfusion_pack.idfusion import synthetic
    os.makedirs(args.work, exist_ok=True)
    clf = D.AttributeClassifier()
    clf.load_state_dict({k: v.float() for k, v in load_file(args.classifier).items()})
    clf.eval()
    rows = {}
    for pred in ("v", "x0"):
        s = {**R.SCALES["cpu"], "base_steps": args.steps, "pred": pred}
        t0 = time.time()
        unet_state, text_state, settings = R.train_base(s, args.work, torch.device("cpu"))
        seconds = time.time() - t0
        patcher = synthetic.build_patcher(settings["unet"], unet_state, pred)
        clip = synthetic.make_clip(settings["vocabulary"], settings["text"]["dim"], settings["text"]["length"], text_state)
        gen = R.Generator(patcher, clip, synthetic.PixelCodec(**settings["codec"]), None, R.SCALES["cpu"]["eval_steps"])
        quality, _ = R.base_quality(gen, clf)
        rows[pred] = {"train_seconds": round(seconds), **quality}
        R.log(f"{pred}: grain {quality['grain_ratio']:.2f}")
    R.write_text_atomic(args.out, json.dumps({"steps": args.steps, "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1))
    print(f"\nbase steps {args.steps}, batch {R.SCALES['cpu']['base_batch']}, same data/seed/loss weighting; 128 samples each")
    print("| prediction | grain (1 = drawn faces) | expression | pose | background |")
    print("|---|---|---|---|---|")
    for pred, r in rows.items():
        print(f"| {pred} | {r['grain_ratio']:.2f} | " + " | ".join(
            f"{100 * r[k + '_follows_caption']['p']:.1f}%" for k in ("expression", "pose", "background")) + " |")


if __name__ == "__main__":
    main()
