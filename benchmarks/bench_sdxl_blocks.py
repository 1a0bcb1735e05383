"""IDFusion's cost in SDXL's transformer blocks at 1024², measured in one run on the CPU (issue 13).

A full SDXL UNet step (10 GB in fp32) is too big and too slow for a 2-core CPU, so this times the part IDFusion
changes: the SpatialTransformers. SDXL has attention at two resolutions; one SpatialTransformer of each (the first
in forward order) is built from SDXL's real module tree with random weights and run through its real forward, with
the transformer_options ComfyUI's UNet hands it (block, original_shape, transformer_index, recorded from a
weightless forward of the whole UNet) on top of the sampler's (the patched ModelPatcher's attn2 replace patches,
after its APPLY_MODEL wrappers). CFG batch 2, text context (2, 77, 2048).

Method as in bench_unet.py: variants interleaved (each repeat times every variant once, in rotated order), warmed
up, each figure the median of the paired per-repeat ratios to plain with its interquartile range.

The whole-UNet figure weights each level by how many BasicTransformerBlocks SDXL has there (read off the model):
transformer blocks only. Convolutions, resnets, up/downsampling and the VAE are not in it, and IDFusion leaves them
unchanged, so a real step's ratio is lower than the transformer-only one.

    python benchmarks/bench_sdxl_blocks.py                          # 5 repeats, 1 warm-up, 1024² image
    python benchmarks/bench_sdxl_blocks.py --repeats 1 --warmup 0   # a quick check that it runs

Reference identities are built through the pack's real Identity/Fusion/install; their h_f are random tensors of the
real shapes (the cost of K_f/V_f and of attending to them does not depend on the values).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import ROOT, setup_host  # noqa: E402  (same host setup: pinned ComfyUI, --cpu, the pack)


def halvings(full: int, side: int) -> int:
    """How many stride-2 (ceil) downsamplings take the latent side `full` to a layer's side `side`."""
    d = 0
    while full > side:
        full, d = (full + 1) // 2, d + 1
    if full != side:
        raise ValueError(f"a layer side {side} is not reached from the latent side {full} by halving")
    return d


def shrink(side: int, d: int) -> int:
    for _ in range(d):
        side = (side + 1) // 2
    return side


def record_transformers(diffusion_model, lat: int, ctx_dim: int, adm: int):
    """Every SpatialTransformer in forward order with the input shape and the transformer_options keys the UNet's
    own forward gives it, from one forward of the weightless (meta) UNet with each transformer stubbed out."""
    import torch
    from comfy.ldm.modules.attention import SpatialTransformer
    names = {m: n for n, m in diffusion_model.named_modules()}
    seen = []

    def stub(x, context=None, transformer_options={}, module=None):
        seen.append({"name": names[module], "module": module, "shape": tuple(x.shape),
                     "options": {k: transformer_options[k] for k in ("block", "original_shape", "transformer_index")},
                     "blocks": len(module.transformer_blocks)})
        return x  # a SpatialTransformer keeps its input's shape

    modules = [m for m in diffusion_model.modules() if isinstance(m, SpatialTransformer)]
    for m in modules:
        m.forward = lambda x, context=None, transformer_options={}, m=m: stub(x, context, transformer_options, m)
    try:
        meta = torch.device("meta")
        kwargs = {"y": torch.empty(2, adm, device=meta)} if adm else {}
        with torch.no_grad():
            diffusion_model(torch.empty(2, diffusion_model.in_channels, lat, lat, device=meta), torch.empty(2, device=meta),
                            context=torch.empty(2, 77, ctx_dim, device=meta), transformer_options={}, **kwargs)
    finally:
        for m in modules:
            del m.forward
    return seen


def summarise(times: list, plain: list) -> dict:
    ratios = [a / b for a, b in zip(times, plain)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median_ms": 1000 * statistics.median(times), "ratio": statistics.median(ratios),
            "ratio_q1": q[0], "ratio_q3": q[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=int, default=1024, help="generated image side in px")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help="variant names to run, separated by ';' (plain always runs)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_sdxl_blocks_cpu.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    setup_host("cpu")

    import torch
    import comfy.patcher_extension as pe
    import random_models
    from idfusion_pack.idfusion.adapter import IDFusionAdapter, find_layers, model_family
    from idfusion_pack.idfusion.identity import Identity
    from idfusion_pack.idfusion.patch import Entry, Fusion, install

    dtype = torch.float32
    lat = args.image // 8
    model = random_models.build_model("SDXL", dtype=dtype, device="meta")  # the module tree, no weights
    dm = model.model.diffusion_model
    cfg = model.model.model_config.unet_config
    ctx_dim, adm = cfg["context_dim"], cfg.get("adm_in_channels") or 0

    # levels: transformers grouped by (channels, token grid); the first of each level in forward order is timed
    transformers = record_transformers(dm, lat, ctx_dim, adm)
    levels = {}
    for t in transformers:
        levels.setdefault(t["shape"][1:], []).append(t)
    timed = {key: group[0] for key, group in levels.items()}
    for key, t in timed.items():  # materialise only these, in fp32 on the CPU, with sane random weights
        t["module"].to_empty(device="cpu")
        random_models.randomize_(t["module"], seed=len(t["name"]))
        t["module"].eval()
    blocks = {t["options"]["block"]: key for key, t in timed.items()}
    layers = [l for l in find_layers(dm) if l.key[:2] in blocks]
    torch.manual_seed(1)
    adapter = IDFusionAdapter(layers, model_family(model))  # Linear_kf/Linear_vf for the timed layers only

    def identity(ref_image: int, seed: int) -> Identity:
        """A reference of ref_image px: h_f at each timed layer with that reference's own token count."""
        g = torch.Generator().manual_seed(seed)
        r = ref_image // 8
        h_f = {}
        for l in layers:
            c, h, w = timed[blocks[l.key[:2]]]["shape"][1:]
            d = halvings(lat, h)
            h_f[l.name] = torch.randn(shrink(r, d) * shrink(r, d), l.channels, generator=g)
        return Identity(layers, adapter.family, {"mode": "cached", "timestep": 0, "text": "zeros"}, [h_f],
                        [torch.randn(1, dm.in_channels, r, r, generator=g)], torch.zeros(1, 77, ctx_dim),
                        torch.zeros(1, adm) if adm else None, f"ref{ref_image}")

    full, half = args.image, args.image // 2
    id_full, id_half = identity(full, 0), identity(half, 1)
    ids3 = [identity(half, 10 + i) for i in range(3)]
    regions = []
    for i in range(3):
        m = torch.zeros(args.image, args.image)
        m[:, i * args.image // 3:(i + 1) * args.image // 3] = 1
        regions.append(m)

    variants = {
        "plain": model,
        f"cached, {full}² ref": install(model, Fusion(adapter, [Entry(id_full)])),
        f"cached, {half}² ref": install(model, Fusion(adapter, [Entry(id_half)])),
    }
    skipped = []
    if "reference_tokens" in inspect.signature(Fusion).parameters:  # the token budget option, where the pack has it
        variants[f"cached, {full}² ref, 2x2 pooled"] = install(model, Fusion(adapter, [Entry(id_full)], reference_tokens="pooled"))
    else:
        skipped.append(f"cached, {full}² ref, 2x2 pooled (Fusion has no reference_tokens option yet)")
    variants[f"3 identities + masks ({half}² refs)"] = install(model, Fusion(adapter, [Entry(i, r) for i, r in zip(ids3, regions)]))
    if args.only:
        keep = {"plain"} | {s.strip() for s in args.only.split(";")}
        variants = {k: v for k, v in variants.items() if k in keep}

    g = torch.Generator().manual_seed(5)
    x = {key: torch.randn(*t["shape"], generator=g) for key, t in timed.items()}
    c = torch.randn(2, 77, ctx_dim, generator=g)
    sigma = torch.full((2,), 1.0)
    x_latent = torch.zeros(2, dm.in_channels, lat, lat)  # what the wrappers see as the step's input

    def step_options(m):
        """The transformer_options one UNet call gets: the sampler's, then through the APPLY_MODEL wrappers as
        BaseModel.apply_model runs them (IDFusion's decides there, once per step, whether it is active)."""
        to = random_models.sampler_transformer_options(m, [1, 0])
        return pe.WrapperExecutor.new_class_executor(
            lambda x_, t_, c_concat, c_crossattn, control, transformer_options, **kw: transformer_options,
            m.model, pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, to)).execute(x_latent, sigma, None, c, None, to)

    def step(m, key):
        t = timed[key]
        to = step_options(m)
        to.update({k: list(v) if isinstance(v, list) else v for k, v in t["options"].items()})  # as UNetModel.forward sets them
        t0 = time.perf_counter()
        with torch.no_grad():
            t["module"](x[key], context=c, transformer_options=to)
        return time.perf_counter() - t0

    names = list(variants)
    for _ in range(args.warmup):
        for n in names:
            for key in timed:
                step(variants[n], key)
    times = {key: {n: [] for n in names} for key in timed}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no variant always runs first
        for n in order:
            for key in timed:
                times[key][n].append(step(variants[n], key))
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, end="\r")

    # whole UNet, transformer blocks only: each level's time scaled by SDXL's BasicTransformerBlocks at that level
    scale = {key: sum(t["blocks"] for t in levels[key]) / timed[key]["blocks"] for key in timed}
    est = {n: [sum(scale[key] * times[key][n][r] for key in timed) for r in range(args.repeats)] for n in names}

    def level_name(key):
        c, h, w = key
        return f"{c} ch, {h}x{w} = {h * w} tokens"

    def identity_keys(m, key):
        """K_f tokens per identity that the variant's patch attended at the level's first layer (its K_f/V_f cache)."""
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        patch = replaces.get((*timed[key]["options"]["block"], 0))
        if patch is None:
            return []
        return [kf.shape[0] for f in patch.fusions for k, kv in f._kv.items() if k[0] == patch.layer.name for kf, _ in kv]

    level_rows = []
    for key, t in timed.items():
        level_rows.append({
            "level": level_name(key), "timed": t["name"], "blocks_in_timed": t["blocks"],
            "transformers_in_unet": [u["name"] for u in levels[key]],
            "blocks_in_unet": sum(u["blocks"] for u in levels[key]),
            "rows": [{"variant": n, "identity_keys": identity_keys(variants[n], key),
                      **summarise(times[key][n], times[key]["plain"]), "times_s": times[key][n]} for n in names]})
    unet_rows = [{"variant": n, **summarise(est[n], est["plain"])} for n in names]

    # memory of one full-size reference over every attn2 layer of the UNet (read off the model; fp32)
    per_ref = {"h_f": 0, "K_f/V_f": 0}
    for key, group in levels.items():
        ch, h, w = key
        for u in group:
            mod = u["module"].transformer_blocks[0].attn2
            per_ref["h_f"] += u["blocks"] * h * w * ch * 4
            per_ref["K_f/V_f"] += u["blocks"] * h * w * 2 * mod.to_k.out_features * 4
    mem = {f"h_f per {full}² reference, all {len(find_layers(dm))} layers, fp32 (MB)": per_ref["h_f"] / 2**20,
           f"K_f/V_f per {full}² reference, all layers, fp32 (MB)": per_ref["K_f/V_f"] / 2**20}

    import comfyui_version
    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "family": "SDXL", "image": args.image, "latent": lat, "dtype": str(dtype), "cfg_batch": 2,
            "context": list(c.shape), "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "attention": __import__("comfy.ldm.modules.attention", fromlist=["x"]).optimized_attention.__name__,
            "skipped": skipped, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "wall_s": time.perf_counter() - t_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "scope": "SpatialTransformers only (GroupNorm, proj_in/out, BasicTransformerBlocks); no resnets or convolutions"}

    print(f"\nIDFusion in SDXL's transformer blocks: {args.image}px ({lat}x{lat} latent), CFG batch 2, cpu {meta['dtype']}, "
          f"{args.repeats} interleaved repeats, attention={meta['attention']}")
    for lv in level_rows:
        print(f"\n{lv['level']}: {lv['timed']} ({lv['blocks_in_timed']} blocks); the UNet has {lv['blocks_in_unet']} "
              f"blocks in {len(lv['transformers_in_unet'])} transformers at this level")
        print(f"{'variant':44s} {'median ms':>10s} {'ratio':>7s}  {'IQR of ratio':>15s}  identity keys")
        for r in lv["rows"]:
            print(f"{r['variant']:44s} {r['median_ms']:10.1f} {r['ratio']:7.3f}  [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"
                  f"  {r['identity_keys']}")
    print("\nwhole UNet, transformer blocks only (levels weighted by their block counts; convolutions excluded)")
    for r in unet_rows:
        print(f"{r['variant']:44s} {r['median_ms']:10.1f} {r['ratio']:7.3f}  [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]")
    for k, v in mem.items():
        print(f"{k:58s} {v:10.1f}")
    for s in skipped:
        print(f"skipped: {s}")
    print(f"load average before {load_before}, after {meta['load_average_after']}; "
          f"wall {meta['wall_s']:.0f} s, peak RSS {meta['peak_rss_mb']:.0f} MB")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    tmp = f"{args.json}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "levels": level_rows, "unet_transformers_only": unet_rows, "memory": mem}, fh, indent=2)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
