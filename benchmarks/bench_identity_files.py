"""Identity file size and load cost, format 1 (h_f stored) against format 2 (latent stored, h_f recomputed), in one run.

    .hosts/0.3.75/venv/bin/python benchmarks/bench_identity_files.py [--repeats 5]

SD1.5 at full width with random weights (scripts/random_models.py), a 512x512 reference through the real VAE and the
real reference pass, on the CPU in fp32. "Load" is what a workflow pays before its first step:
- format 1: Identity.load (header checks, tensors read and checked);
- format 2: Identity.load, then Identity.for_model (the one UNet pass per reference, what the Apply node runs).
The two are interleaved (rotated order) after a warm-up; the ratio is the median of the paired per-repeat ratios.
SDXL at 1024 px: the format-2 file is written for real (its size depends on the latent, the 2048-wide text context
and the pooled vector, not on the UNet weights); the format-1 size is computed from the layer shapes (one fp32 h_f per
attn2 layer and token), not written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_identity_files.json"))
    args = ap.parse_args()
    from bench_unet import setup_host
    setup_host("cpu")
    import torch
    import comfyui_version
    import random_models
    from idfusion_pack.idfusion.adapter import find_layers
    from idfusion_pack.idfusion.identity import Identity, encode_identity

    torch.manual_seed(0)
    model = random_models.build_model("SD15", seed=0)
    vae = random_models.build_vae(seed=3)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 512, 512, 3, generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        identity = encode_identity(model, vae, image, name="bench")
    encode_s = time.perf_counter() - t0
    out = {"date": time.strftime("%Y-%m-%d"), "comfyui": comfyui_version.__version__, "torch": torch.__version__,
           "device": "cpu", "threads": torch.get_num_threads(), "encode_seconds": round(encode_s, 2), "sd15_512": {},
           "load_average_before_timing": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {1: os.path.join(tmp, "v1.safetensors"), 2: os.path.join(tmp, "v2.safetensors")}
        identity.save(paths[1], with_h_f=True)
        identity.save(paths[2])
        sizes = {v: os.path.getsize(p) for v, p in paths.items()}

        def load(version):
            t = time.perf_counter()
            with torch.inference_mode():
                ident = Identity.load(paths[version])
                if version == 2:
                    ident = ident.for_model(model)
            return time.perf_counter() - t, ident

        # format 2 gives back exactly the h_f that was encoded (same model, same latent, same timestep)
        _, v2 = load(2)
        same = all(torch.equal(v2.h_f[0][l.name], identity.h_f[0][l.name]) for l in identity.layers)
        for _ in range(args.warmup):
            load(1), load(2)
        times = {1: [], 2: []}
        for r in range(args.repeats):
            for v in ((1, 2) if r % 2 == 0 else (2, 1)):
                times[v].append(load(v)[0])
    ratios = [b / a for a, b in zip(times[1], times[2])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    out["sd15_512"] = {"format 1 bytes": sizes[1], "format 2 bytes": sizes[2], "size ratio": sizes[1] / sizes[2],
                       "format 1 load s (median)": statistics.median(times[1]),
                       "format 2 load + reference pass s (median)": statistics.median(times[2]),
                       "load ratio format 2 / format 1 (median of paired)": statistics.median(ratios),
                       "load ratio IQR": [q[0], q[2]], "repeats": args.repeats, "format 2 h_f identical to encoded": same,
                       "format 1 load s": times[1], "format 2 load + reference pass s": times[2]}

    # SDXL at 1024 px: the real format-2 file; format 1's size from the layer shapes
    meta = random_models.build_model("SDXL", device="meta")
    layers = find_layers(meta.model.diffusion_model)
    cfg = meta.model.model_config.unet_config
    adm, ctx = cfg["adm_in_channels"], cfg["context_dim"]
    lat = 1024 // 8
    xl = Identity(layers, "SDXL", {"mode": "cached", "timestep": 0, "text": "empty"}, [None],
                  [torch.randn(1, 4, lat, lat)], torch.randn(1, 77, ctx), torch.randn(1, adm), "xl",
                  thumbnails=[torch.zeros(64, 64, 3, dtype=torch.uint8)])
    # tokens at a layer: the latent side halves (ceil) once per level; a layer's level is the first whose width
    # (model_channels * channel_mult) is the layer's
    def tokens(channels):
        level = [cfg["model_channels"] * m for m in cfg["channel_mult"]].index(channels)
        side = lat
        for _ in range(level):
            side = -(-side // 2)
        return side * side
    with tempfile.TemporaryDirectory() as tmp:
        xl.save(os.path.join(tmp, "xl.safetensors"))
        xl_v2 = os.path.getsize(os.path.join(tmp, "xl.safetensors"))
    xl_v1 = sum(tokens(l.channels) * l.channels * 4 for l in layers)
    out["sdxl_1024"] = {"format 2 bytes": xl_v2, "format 1 bytes (computed: fp32 h_f of every layer)": xl_v1,
                        "layers": len(layers)}

    s = out["sd15_512"]
    print(f"SD1.5, 512 px reference (CPU, fp32, {out['threads']} threads, {comfyui_version.__version__}):")
    print(f"  format 1 (h_f stored)        {s['format 1 bytes'] / 1e6:8.2f} MB   load {s['format 1 load s (median)']:.2f} s")
    print(f"  format 2 (latent, recompute) {s['format 2 bytes'] / 1e6:8.3f} MB   load + pass {s['format 2 load + reference pass s (median)']:.2f} s")
    print(f"  size ratio {s['size ratio']:.0f}x; load ratio format 2 / format 1: {s['load ratio format 2 / format 1 (median of paired)']:.2f} "
          f"(IQR {q[0]:.2f}-{q[2]:.2f}, {args.repeats} paired repeats); h_f identical to encoded: {same}")
    print(f"  encoding the reference (VAE + pass): {encode_s:.2f} s; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"SDXL, 1024 px reference: format 2 {xl_v2 / 1e6:.3f} MB (written); format 1 {xl_v1 / 1e6:.0f} MB (computed, {len(layers)} layers)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
