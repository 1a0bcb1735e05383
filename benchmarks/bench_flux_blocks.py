"""IDFusion's cost in Flux's blocks at 1024², measured in one run on the CPU (issue 19).

A whole Flux dev step (19 double + 38 single blocks, 12 G parameters) is far too big for a 2-core CPU, so this times
what IDFusion changes: one double and one single block at Flux dev's width (hidden 3072, 24 heads, mlp 4x, Flux's
RoPE axes), built by ComfyUI's own Flux class with random weights, each run through its real forward with the
transformer_options the sampler hands it after the APPLY_MODEL wrappers (the patched ModelPatcher's attention
override, IDFusion's token layout) plus the block_type / block_index Flux's forward sets. 1024² image = 4096 image
tokens, 512 text tokens, batch 1 (Flux dev runs without a CFG batch: its guidance is distilled).

Variants, each the same block input:
- plain;
- IDFusion with one reference of 256 tokens (a 256² reference) and of 1024 tokens (a 512² reference), cached mode:
  K_f/V_f are projected, key-normed and rotated once per reference before sampling (timed separately, not per step);
- ComfyUI's in-context ReferenceLatent with the same 1024-token reference, and with a full-size 1024² reference
  (4096 tokens): its tokens join the image stream, so every linear and the attention grow.

Method as in bench_sdxl_blocks.py: variants interleaved (each repeat times every variant once, in rotated order),
each figure the median of the paired per-repeat ratios to plain with its interquartile range. A Flux step is
57 blocks of these two kinds; the step estimate weights the two timings 19:38 (Flux dev's block counts), blocks only
(the embedders and the final layer are unchanged by IDFusion and excluded, so a real step's ratio is slightly lower).

    python benchmarks/bench_flux_blocks.py                  # 3 repeats
    python benchmarks/bench_flux_blocks.py --repeats 1      # a check that it runs (~25 min on a loaded 2-core VM)

Peak RSS was 11.3 GB in the 2026-11-30 run (probably the 4096-token ReferenceLatent variant): check `free -g` first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import ROOT, setup_host  # noqa: E402  (same host setup: pinned ComfyUI, --cpu, the pack)

FLUX_DEV_BLOCKS = {"double": 19, "single": 38}


def summarise(times: list, plain: list) -> dict:
    ratios = [a / b for a, b in zip(times, plain)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median_s": statistics.median(times), "ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=int, default=1024, help="generated image side in px")
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_flux_blocks_cpu.json"))
    args = ap.parse_args()
    t_start, load_before = time.perf_counter(), os.getloadavg()
    setup_host("cpu")
    import torch
    import comfy.patcher_extension as pe
    import random_flux
    import random_models
    from idfusion_pack.idfusion import patch_flux
    from idfusion_pack.idfusion.identity import Identity
    from idfusion_pack.idfusion.patch import Entry

    torch.manual_seed(0)
    mp = random_flux.build_small_flux("dev", seed=0, **{k: v for k, v in random_flux.DEV_WIDTH.items()
                                                        if k not in ("depth", "depth_single_blocks")},
                                      depth=1, depth_single_blocks=1)
    dm = mp.model.diffusion_model
    layers = patch_flux.find_layers(dm)
    lat = args.image // 8                                   # Flux's VAE: 8x
    hidden = dm.hidden_size

    def identity(ref_px: int) -> Identity:
        side = ref_px // 8
        n = (side // 2) ** 2
        g = torch.Generator().manual_seed(ref_px)
        h_f = {l.name: torch.randn(n, hidden, generator=g) for l in layers}
        return Identity(layers, "Flux", {"mode": "cached", "timestep": 0, "text": "zeros"}, [h_f],
                        [torch.zeros(1, 16, side, side)], torch.zeros(1, 1, 768), torch.zeros(1, 768), f"ref{ref_px}")

    adapter = patch_flux.fresh_adapter(mp, init="random", seed=1)
    variants = {"plain": (mp, None)}
    one_off = {}
    for px in (256, 512):
        f = patch_flux.FluxFusion(adapter, [Entry(identity(px))])
        m = patch_flux.install(mp, f)
        t0 = time.perf_counter()
        with torch.no_grad():
            for l in layers:  # cached mode: once per reference before sampling
                f.kv_heads(l, torch.device("cpu"), torch.float32, None, dm)
        one_off[f"IDFusion {(px // 16) ** 2} reference tokens"] = time.perf_counter() - t0
        variants[f"IDFusion, {(px // 16) ** 2} reference tokens"] = (m, None)
    for px in (512, args.image):
        variants[f"ReferenceLatent, {(px // 16) ** 2} reference tokens"] = (mp, torch.randn(1, 16, px // 8, px // 8))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, lat, lat, generator=g)
    img0 = torch.randn(1, (lat // 2) ** 2, hidden, generator=g)
    txt0 = torch.randn(1, args.text, hidden, generator=g)
    vec = torch.randn(1, hidden, generator=g)
    sigma = torch.full((1,), 0.8)

    def inputs(ref):
        """(img, txt, pe) as Flux's forward builds them: image ids, ReferenceLatent's ids (offset method), text at 0."""
        img, ids = dm.process_img(x)
        img = img0
        if ref is not None:
            kontext, kids = dm.process_img(ref, index=1)
            img = torch.cat([img, torch.randn(1, kontext.shape[1], hidden, generator=torch.Generator().manual_seed(2))], 1)
            ids = torch.cat([ids, kids], 1)
        txt_ids = torch.zeros(1, args.text, ids.shape[-1])
        return img, dm.pe_embedder(torch.cat([txt_ids, ids], 1))

    prepared = {n: inputs(ref) for n, (_, ref) in variants.items()}

    def step_options(m, ref):
        to = random_models.sampler_transformer_options(m, [0])
        kw = {"ref_latents": [ref]} if ref is not None else {}
        return pe.WrapperExecutor.new_class_executor(
            lambda x_, t_, c_concat, c_crossattn, control, transformer_options, **k: transformer_options,
            m.model, pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, to)).execute(x, sigma, None, None, None, to, **kw)

    def step(name, kind):
        m, ref = variants[name]
        img, pe_ = prepared[name]
        to = step_options(m, ref)
        to.update(block_type=kind, block_index=0, total_blocks=1)
        img, txt = img.clone(), txt0.clone()               # the blocks add in place
        t0 = time.perf_counter()
        with torch.no_grad():
            if kind == "double":
                dm.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe_, transformer_options=to)
            else:
                dm.single_blocks[0](torch.cat([txt, img], 1), vec=vec, pe=pe_, transformer_options=to)
        return time.perf_counter() - t0

    names = list(variants)
    times = {k: {n: [] for n in names} for k in FLUX_DEV_BLOCKS}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            for kind in FLUX_DEV_BLOCKS:
                times[kind][n].append(step(n, kind))
                print(f"repeat {r + 1}/{args.repeats} {n} {kind}: {times[kind][n][-1]:.1f} s", file=sys.stderr)

    est = {n: [sum(FLUX_DEV_BLOCKS[k] * times[k][n][r] for k in FLUX_DEV_BLOCKS) for r in range(args.repeats)] for n in names}
    rows = {k: [{"variant": n, **summarise(times[k][n], times[k]["plain"]), "times_s": times[k][n]} for n in names]
            for k in FLUX_DEV_BLOCKS}
    step_rows = [{"variant": n, **summarise(est[n], est["plain"])} for n in names]

    import comfyui_version
    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "model": "Flux dev width (hidden 3072, 24 heads, mlp 4x), 1 double + 1 single block, random fp32",
            "image": args.image, "image_tokens": (lat // 2) ** 2, "text_tokens": args.text, "batch": 1,
            "repeats": args.repeats, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "attention": __import__("comfy.ldm.modules.attention", fromlist=["x"]).optimized_attention.__name__,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "wall_s": time.perf_counter() - t_start, "one_off_projection_s": one_off,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "scope": "one double and one single block (attention, linears, MLPs, modulation); step = 19 double + 38 "
                     "single, blocks only"}

    print(f"\nIDFusion in Flux's blocks: {args.image}px ({(lat // 2) ** 2} image + {args.text} text tokens), batch 1, "
          f"cpu fp32, {args.repeats} interleaved repeats, attention={meta['attention']}")
    for kind in FLUX_DEV_BLOCKS:
        print(f"\n{kind} block")
        print(f"{'variant':40s} {'median s':>9s} {'ratio':>7s}  {'IQR of ratio':>15s}")
        for r in rows[kind]:
            print(f"{r['variant']:40s} {r['median_s']:9.2f} {r['ratio']:7.3f}  [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]")
    print("\nFlux dev step, blocks only (19 double + 38 single)")
    for r in step_rows:
        print(f"{r['variant']:40s} {r['median_s']:9.1f} {r['ratio']:7.3f}  [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]")
    for k, v in one_off.items():
        print(f"one-off K_f/V_f for 2 blocks, {k}: {v:.2f} s")
    print(f"load average before {load_before}, after {meta['load_average_after']}; wall {meta['wall_s']:.0f} s, "
          f"peak RSS {meta['peak_rss_mb']:.0f} MB")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    tmp = f"{args.json}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "blocks": rows, "step_blocks_only": step_rows}, fh, indent=2)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
