"""Does reference augmentation in training make the UNet adapter robust to reference nuisance? (issue 17)

Measured on VALIDATION identities only. Three adapters, same base (the shipped models/synthetic_faces.safetensors):
  shipped:   the shipped adapter (6000 steps, no augmentation);
  more:      its training state continued `--steps` more steps without augmentation (the control: more steps alone);
  augmented: the same continuation with TrainConfig.reference_shift / _noise / _background (same data order, seeds).
Each reads four reference variants of the same validation identities, scenes, captions and seeds: clean, jitter past
the renderer's training range (0.05-0.07 of the side), pixel noise sd 12, a background colour outside the named set.
Caveat, stated in every output: a shift augmentation of 0.1 covers the far jitter, and random background colours
cover off-set ones, so for the augmented adapter those two variants test the augmentation, not extrapolation.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/augment_study.py [--steps 500] [--ids 48]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]
AUGMENT = {"reference_shift": 0.1, "reference_noise": 8.0, "reference_background": 0.5}


def continued(R, s, work, patcher, clip, codec, base_key, steps, augment):
    """The shipped adapter's train state continued `steps` more steps (resume: same LR, data order and seeds)."""
    import domain as D
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    train_ids = D.identities("training", s["train_ids"])
    src, _ = R.train_adapter(s, work, patcher, clip, codec, train_ids, base_key)   # cached: the shipped run
    total = s["adapter_steps"] + steps
    out = os.path.join(work, f"augment-study-{R.key({'src': src, 'steps': total, 'augment': augment})}")
    os.makedirs(out, exist_ok=True)
    state = os.path.join(out, "synthetic.train-state.safetensors")
    if not os.path.isfile(state):
        shutil.copyfile(src.replace(".safetensors", ".train-state.safetensors"), state)
    cfg = TrainConfig(steps=total, batch_size=s["adapter_batch"], lr=1e-3, warmup_steps=20, save_every=500, seed=R.SEED,
                      init="attn1", reference="other image", reference_dropout=0.1, face_loss_weight=1.0,
                      encoding="cached", timestep=0, gradient_checkpointing=False, **augment)
    data = os.path.join(work, f"adapter-data-{R.key({'ids': len(train_ids), 'per_id': s['per_id'], 'v': 3})}")
    trainer = Trainer(patcher, clip, codec, FaceDataset(data, D.PICTURE), out, "synthetic", cfg)
    trainer.resume()
    t0 = time.time()
    if trainer.step < total:
        trainer.run(on_step=lambda step, loss: step % 250 == 0 and R.log(f"{augment or 'no augmentation'} step {step} "
                                                                         f"loss {loss:.4f} ({time.time() - t0:.0f}s)"))
    return trainer.adapter_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="steps past the shipped adapter's 6000")
    ap.add_argument("--ids", type=int, default=48, help="validation identities (2 captions each)")
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic"))
    ap.add_argument("--out", default=os.path.join(ROOT, ".synthetic", "augment_study.json"))
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from train import load_pack
    load_pack(args.comfyui, cpu=True)
    import fit as F
    import run as R
    from idfusion_pack.idfusion import synthetic
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    s = R.SCALES["cpu"]
    t0 = time.time()
    patcher, clip, codec, _ = synthetic.load(os.path.join(ROOT, "models", "synthetic_faces.safetensors"))
    shipped_path = os.path.join(ROOT, "models", "idfusion", "synthetic_faces_adapter.safetensors")
    shipped = IDFusionAdapter.load(shipped_path)
    base_key = R.key(R.base_phases(s)[-1])
    adapters = {"shipped": shipped,
                "more": IDFusionAdapter.load(continued(R, s, args.work, patcher, clip, codec, base_key, args.steps, {})),
                "augmented": IDFusionAdapter.load(continued(R, s, args.work, patcher, clip, codec, base_key, args.steps,
                                                            AUGMENT))}
    trained = time.time() - t0
    per = 2
    ids, candidates, truths, (refs, ref_scenes, captions, _) = R.validation_cell(args.ids, per, 7_500)
    r2 = np.random.default_rng(7_600)
    far = r2.uniform(0.05, 0.07, (len(ids), 1, 2)) * r2.choice([-1, 1], (len(ids), 1, 2))
    variants = {"clean": refs,
                "jitter past the training range": R.reference_drawings(ids, r2, ref_scenes, jitter=far)[0],
                "pixel noise sd 12": R.reference_drawings(ids, np.random.default_rng(7_700), ref_scenes, noise_sd=12.0)[0],
                "background outside the set": R.reference_drawings(
                    ids, r2, ref_scenes, backgrounds=[R.off_set_background(r2) for _ in ids])[0]}
    hits = {}
    for name, adapter in adapters.items():
        gen = R.recommended_generator(patcher, clip, codec, adapter, s["eval_steps"])
        for v, vrefs in variants.items():
            hits[(name, v)] = R.retrieval_hits(F.fit(R.generate(gen, [[r] for r in vrefs], captions, 7_800)), truths,
                                               candidates)
            R.log(f"{name}, {v}: retrieval {np.mean(hits[(name, v)]):.3f}")
    out = {"identities": args.ids, "pictures per cell": len(truths), "steps past shipped": args.steps,
           "augmentation": AUGMENT, "settings": {"cfg": gen.cfg, "uncond": gen.uncond, "weight": gen.weight},
           "caveat": "shift 0.1 covers the far jitter and random background colours cover off-set ones: for the "
                     "augmented adapter those variants test the augmentation, not extrapolation",
           "retrieval": {f"{a}, {v}": R.rate(h) for (a, v), h in hits.items()},
           "cost against clean": {f"{a}, {v}": R.paired(hits[(a, "clean")], h) for (a, v), h in hits.items() if v != "clean"},
           "augmented minus more": {v: R.paired(hits[("augmented", v)], hits[("more", v)]) for v in variants},
           "seconds": {"training": round(trained), "total": round(time.time() - t0)}}
    R.write_text_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("cost against clean", "augmented minus more")}, indent=1))


if __name__ == "__main__":
    main()
