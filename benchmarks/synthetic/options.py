"""Identity accuracy of the shipped synthetic model under issue 13's file and token options, same seeds for all.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/options.py [--per-identity 64]

Cell (a) of benchmarks/synthetic/run.py (the 8 unseen identities, one reference each, captions from the held-out
scenes, its seeds) through the pack's nodes, once per variant:
- encoded: Encode Reference Face -> Apply (what the report measures);
- format 1 file / format 2 file: the identity saved in that format and loaded back (format 2 stores no h_f: the Apply
  node recomputes it with one reference pass);
- 2x2 pooled tokens: Apply with reference_tokens pooled at the highest-resolution layers;
- no adapter: the base model, same seeds.
Every variant samples the same captions with the same seeds, so differences are paired: the script prints each
variant's accuracy with its standard error and its paired difference to "encoded" with the SE of that difference.
Results go to benchmarks/results/synthetic_options.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]
POOLED = "2x2 pooled at the highest resolution"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-identity", type=int, default=64, help="samples per unseen identity (the report uses 16)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "synthetic_options.json"))
    args = ap.parse_args(argv)
    from train import load_pack
    load_pack(args.comfyui, cpu=True)
    import comfyui_version
    import domain as D
    import run
    from idfusion_pack.idfusion import synthetic
    from safetensors.torch import load_file
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    from idfusion_pack.idfusion.identity import Identity

    models = os.path.join(ROOT, "models")
    patcher, clip, codec, _ = synthetic.load(os.path.join(models, "synthetic_faces.safetensors"))
    adapter = IDFusionAdapter.load(os.path.join(models, "idfusion", "synthetic_faces_adapter.safetensors"))
    clf = D.AttributeClassifier()
    clf.load_state_dict({k: v.float() for k, v in load_file(os.path.join(models, "classifier", "synthetic_faces_classifier.safetensors")).items()})
    clf.eval().requires_grad_(False)
    gen = run.Generator(patcher, clip, codec, adapter, run.SCALES["cpu"]["eval_steps"])
    apply_node = gen.nodes["IDFusionApply"]
    pooled_available = "reference_tokens" in apply_node.INPUT_TYPES().get("optional", {})
    _, unseen = run.split_identities(run.SCALES["cpu"])

    def apply(identity, **options):
        return run.node_call(apply_node, "apply", patcher, adapter, identity, 1.0, 0.0, 1.0, "text only", "cached", **options)[0]

    n = args.per_identity
    hits = {k: [] for k in ("encoded", "format 1 file", "format 2 file", "2x2 pooled tokens", "no adapter")}
    if not pooled_available:
        del hits["2x2 pooled tokens"]
    sizes, seconds = {}, {k: 0.0 for k in hits}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, ident in enumerate(unseen):
            rng = np.random.default_rng(10_000 + i)             # cell (a)'s reference, captions and seed
            ref = D.render([ident], D.random_scene_from(rng, held_out=True), rng)[0]
            caps = [D.caption(D.random_scene_from(rng, held_out=True)) for _ in range(n)]
            seed = 20_000 + i
            encoded = gen.identity([ref])
            loaded = {}
            for label, with_h_f in (("format 1 file", True), ("format 2 file", False)):
                path = os.path.join(tmp, f"{i}_{with_h_f}.safetensors")
                encoded.save(path, with_h_f=with_h_f)
                sizes.setdefault(label, os.path.getsize(path))
                loaded[label] = Identity.load(path)
            models_ = {"encoded": lambda: apply(encoded), "format 1 file": lambda: apply(loaded["format 1 file"]),
                       "format 2 file": lambda: apply(loaded["format 2 file"]), "no adapter": lambda: patcher}
            if pooled_available:
                models_["2x2 pooled tokens"] = lambda: apply(encoded, reference_tokens=POOLED)
            for label in hits:
                t = time.time()
                x = gen.sample(models_[label](), caps, seed=seed)
                seconds[label] += time.time() - t
                scores = D.identity_scores(clf.log_probs(x), unseen)
                hits[label] += (scores.argmax(1) == i).tolist()
            print(f"identity {i}: " + ", ".join(f"{k} {np.mean(v[-n:]):.2f}" for k, v in hits.items()), flush=True)

    def se(h):
        p = float(np.mean(h))
        return math.sqrt(max(p * (1 - p), 1e-12) / len(h))

    base = np.array(hits["encoded"], float)
    out = {"date": time.strftime("%Y-%m-%d"), "comfyui": comfyui_version.__version__, "torch": torch.__version__,
           "device": "cpu", "per_identity": n, "identities": len(unseen), "chance": 1 / len(unseen),
           "seconds": round(time.time() - t0), "file_bytes": sizes, "sampling_seconds": {k: round(v, 1) for k, v in seconds.items()},
           "variants": {}}
    print(f"\nidentity accuracy on the 8 unseen identities, n = {len(base)} per variant, same captions and seeds:")
    for label, h in hits.items():
        d = np.array(h, float) - base
        row = {"accuracy": float(np.mean(h)), "se": se(h), "n": len(h), "minus_encoded": float(d.mean()),
               "paired_se": float(d.std(ddof=1) / math.sqrt(len(d))) if d.any() else 0.0}
        out["variants"][label] = row
        print(f"  {label:18s} {row['accuracy']:.3f} ± {row['se']:.3f}   minus encoded {row['minus_encoded']:+.3f} "
              f"(paired SE {row['paired_se']:.3f})")
    if pooled_available:
        r = out["variants"]["2x2 pooled tokens"]
        out["pooled_within_one_se"] = abs(r["minus_encoded"]) <= out["variants"]["encoded"]["se"]
        print(f"  pooled tokens within one SE of encoded: {out['pooled_within_one_se']}")
    print(f"  file sizes (bytes): {sizes}; {out['seconds']} s in all")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
