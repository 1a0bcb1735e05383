"""Per-step cost of IDFusion against the plain UNet, measured in one run (issue: Speed).

Every figure is a ratio to the plain UNet measured in the same run: variants are interleaved (each repeat
times every variant once, in rotated order), warmed up, and summarised by the median of the paired
per-repeat ratios with its interquartile spread. One "step" is one UNet evaluation of a CFG batch
(cond + uncond) exactly as ComfyUI's sampler calls it: BaseModel.apply_model with the patched
ModelPatcher's transformer_options (attn2 replace patches and the APPLY_MODEL wrapper).

    python benchmarks/bench_unet.py                      # CPU, small config: SD1.5 architecture, 128px image
    python benchmarks/bench_unet.py --device cuda        # GPU: SD1.5, 512px, fp16 (the issue's targets)
    python benchmarks/bench_unet.py --device cuda --family SDXL --image 1024

Random weights built from ComfyUI's own classes at full channel width (scripts/random_models.py).
Reference sizes are given relative to the generated image ("full" = same size, the 512^2-with-512^2 case;
"half" = half the side, the 256^2 case), so the CPU config keeps the GPU config's proportions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_host(device):
    comfy_dir = os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI")
    sys.path[:0] = [comfy_dir, os.path.join(ROOT, "scripts")]
    import comfy.cli_args
    if device == "cpu":
        comfy.cli_args.args.cpu = True
    import importlib.util
    spec = importlib.util.spec_from_file_location("idfusion_pack", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["idfusion_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--family", default="SD15", choices=["SD15", "SDXL"])
    ap.add_argument("--image", type=int, default=None, help="generated image side in px (default 128 on CPU, 512 on GPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default="", help="variant names to run, separated by ';' (plain always runs)")
    ap.add_argument("--no-encoding", action="store_true", help="skip the reference-encoding timing (saves time at 512²)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_unet.json"))
    args = ap.parse_args()
    pack = setup_host(args.device)

    import torch
    import random_models
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    from idfusion_pack.idfusion.identity import Identity, reference_sigma, run_reference_pass, text_condition
    from idfusion_pack.idfusion.patch import Entry, Fusion, install

    dev = torch.device(args.device)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    image = args.image or (512 if args.device == "cuda" else 128)
    lat = image // 8
    torch.manual_seed(0)
    model = random_models.build_model(args.family, dtype=dtype, seed=0)
    model.model.to(dev)
    model.load_device = dev
    base = model.model
    ctx_dim = base.model_config.unet_config["context_dim"]
    adm = base.model_config.unet_config.get("adm_in_channels") or 0
    adapter = IDFusionAdapter.fresh(model, init="random", seed=1)
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else (lambda: None)

    def encode(side, refs=1, seed=0):
        """Real reference pass (the encoder's code path minus the VAE) on random latents."""
        g = torch.Generator().manual_seed(seed)
        context, y, _ = text_condition(model)
        sigma = reference_sigma(model, 0)
        h_f, lats = [], []
        for _ in range(refs):
            x = torch.randn(1, 4, side, side, generator=g).to(dev, dtype)
            rec = run_reference_pass(base, dev, x, sigma, context.to(dtype), None if y is None else y.to(dtype))
            h_f.append({l.name: rec[l.key][0].float().cpu() for l in adapter.layers})
            lats.append(x.float().cpu())
        return Identity(adapter.layers, "bench", {"mode": "cached", "timestep": 0, "text": "zeros"}, h_f, lats, context, y, "bench")

    full, half = lat, lat // 2
    id_full, id_half = encode(full), encode(half, seed=1)
    id_half3 = encode(half, refs=3, seed=2)
    ids3 = [encode(half, seed=10 + i) for i in range(3)]
    H = W = image
    regions = []
    for i in range(3):
        m = torch.zeros(H, W)
        m[:, i * W // 3:(i + 1) * W // 3] = 1
        regions.append(m)

    def fused(entries, **kw):
        return install(model, Fusion(adapter, entries, **kw))

    class NoCache(Fusion):
        """Ablation: re-project K_f/V_f at every call (what caching saves)."""
        def kv(self, layer, device, dtype_, state):
            self._kv.clear()
            return super().kv(layer, device, dtype_, state)

    class DecoupledIPAttention:
        """Peer baseline (IP-Adapter): a second attention over n image tokens, added to the text attention."""
        def __init__(self, n, layer):
            g = torch.Generator().manual_seed(n)
            self.k = (torch.randn(n, layer.inner, generator=g) * 0.1).to(dev, dtype)
            self.v = (torch.randn(n, layer.inner, generator=g) * 0.1).to(dev, dtype)

        def __deepcopy__(self, memo):
            return self

        def __call__(self, q, k, v, extra):
            from comfy.ldm.modules.attention import optimized_attention
            b = q.shape[0]
            heads = extra["n_heads"]
            out = optimized_attention(q, k, v, heads)
            return out + optimized_attention(q, self.k.expand(b, -1, -1), self.v.expand(b, -1, -1), heads)

    def ip_adapter(n):
        m = model.clone()
        for l in adapter.layers:
            m.set_model_attn2_replace(DecoupledIPAttention(n, l), *l.key)
        return m

    class Recompute(dict):
        """Ablation: a mask cache that forgets, so every call rebuilds the Eq. 7 mask."""
        def __contains__(self, key):
            return False

    no_cache = install(model, NoCache(adapter, [Entry(id_full)]))
    masks_rebuilt = fused([Entry(i, r) for i, r in zip(ids3, regions)])
    for p in masks_rebuilt.model_options["transformer_options"]["patches_replace"]["attn2"].values():
        p._masks = Recompute()
    variants = {
        "plain": model,
        "weight 0": pack.NODE_CLASS_MAPPINGS["IDFusionApply"]().apply(model, adapter, id_full, 0.0, 0.0, 1.0, "text only", "cached")[0],
        "cached, full-size ref": fused([Entry(id_full)]),
        "cached, half-size ref": fused([Entry(id_half)]),
        "cached, full-size ref, 2x2 pooled": fused([Entry(id_full)], reference_tokens="pooled"),  # token budget option
        "3 references (half-size)": fused([Entry(id_half3)]),
        "3 identities + masks (half-size)": fused([Entry(i, r) for i, r in zip(ids3, regions)]),
        "per-step, full-size ref": fused([Entry(id_full)], mode="per_step"),
        "no K_f/V_f cache (ablation)": no_cache,
        "3 identities, mask rebuilt every call (ablation)": masks_rebuilt,
        "IP-Adapter-style, 4 tokens": ip_adapter(4),
        "IP-Adapter-style, 16 tokens": ip_adapter(16),
    }
    if args.only:
        keep = {"plain"} | {s.strip() for s in args.only.split(";")}
        variants = {k: v for k, v in variants.items() if k in keep}

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, lat, lat, generator=g).to(dev, dtype)
    c = torch.randn(2, 77, ctx_dim, generator=g).to(dev, dtype)
    sigma = torch.full((2,), 1.0, device=dev)
    kwargs = {"y": torch.zeros(2, adm, device=dev, dtype=dtype)} if adm else {}

    def step(m):
        to = random_models.sampler_transformer_options(m, [1, 0])
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            base.apply_model(x, sigma, c_crossattn=c, transformer_options=to, **kwargs)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    names = list(variants)
    for _ in range(args.warmup):
        for n in names:
            step(variants[n])
    times = {n: [] for n in names}
    # CPU time of this process as well as wall time: on a CPU shared with other jobs, wall time mostly measures
    # their load; the process's own CPU seconds are far less sensitive to it (not on GPU, where it means little)
    cpu = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no variant always runs first
        for n in order:
            wall, proc = step(variants[n])
            times[n].append(wall)
            cpu[n].append(proc)
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, end="\r")

    # encoding: one reference pass (batch 1, full-size ref) vs one plain UNet forward of the same batch
    x1 = torch.randn(1, 4, full, full).to(dev, dtype)
    ctx1, y1, _ = text_condition(model)
    enc, fwd = [], []
    for r in range(0 if args.no_encoding else args.repeats + args.warmup):
        sync()
        t0 = time.perf_counter()
        run_reference_pass(base, dev, x1, reference_sigma(model, 0), ctx1.to(dtype), None if y1 is None else y1.to(dtype))
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            base.apply_model(x1, torch.ones(1, device=dev), c_crossattn=ctx1.to(dev, dtype), **({"y": y1.to(dev, dtype)} if y1 is not None else {}))
        sync()
        t2 = time.perf_counter()
        if r >= args.warmup:
            enc.append(t1 - t0)
            fwd.append(t2 - t1)

    def kv_bytes(fusion_):
        return sum(t.numel() * t.element_size() for kv in fusion_._kv.values() for pair in kv for t in pair)

    cached = variants.get("cached, full-size ref")
    mem = {}
    if cached is not None:
        patch = next(iter(cached.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
        f = patch.fusions[0]
        mem["K_f/V_f cache per full-size reference (MB)"] = kv_bytes(f) / 2**20
        mem["h_f per full-size reference, stored fp32 on CPU (MB)"] = sum(t.numel() * 4 for t in id_full.h_f[0].values()) / 2**20
        if args.device == "cuda":
            mem["GPU memory now allocated (MB)"] = torch.cuda.memory_allocated() / 2**20

    plain = times["plain"]
    rows = []
    for n in names:
        ratios = [a / b for a, b in zip(times[n], plain)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        cpu_ratios = [a / b for a, b in zip(cpu[n], cpu["plain"])]
        cq = statistics.quantiles(cpu_ratios, n=4) if len(cpu_ratios) >= 2 else [cpu_ratios[0]] * 3
        rows.append({"variant": n, "median_ms": 1000 * statistics.median(times[n]), "ratio": statistics.median(ratios),
                     "ratio_q1": q[0], "ratio_q3": q[2], "cpu_ratio": statistics.median(cpu_ratios),
                     "cpu_ratio_q1": cq[0], "cpu_ratio_q3": cq[2]})
    enc_ratios = [a / b for a, b in zip(enc, fwd)]
    if enc_ratios:
        rows.append({"variant": "reference encoding (1 pass) / 1 plain forward, batch 1", "median_ms": 1000 * statistics.median(enc),
                     "ratio": statistics.median(enc_ratios), "ratio_q1": statistics.quantiles(enc_ratios, n=4)[0],
                     "ratio_q3": statistics.quantiles(enc_ratios, n=4)[2]})

    import comfyui_version
    import platform
    meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "family": args.family, "image": image, "latent": lat, "dtype": str(dtype), "cfg_batch": 2,
            "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "attention": __import__("comfy.ldm.modules.attention", fromlist=["x"]).optimized_attention.__name__}
    print(f"\nIDFusion step cost vs plain UNet: {meta['family']} {image}px ({lat}x{lat} latent), CFG batch 2, "
          f"{meta['device']} {meta['dtype']}, {args.repeats} interleaved repeats, attention={meta['attention']}")
    print(f"{'variant':58s} {'median ms':>10s} {'ratio':>7s}  {'IQR of ratio':>15s}  {'CPU-time ratio [IQR]':>26s}")
    for r in rows:
        c = f"{r['cpu_ratio']:7.3f}  [{r['cpu_ratio_q1']:.3f}, {r['cpu_ratio_q3']:.3f}]" if "cpu_ratio" in r else ""
        print(f"{r['variant']:58s} {r['median_ms']:10.1f} {r['ratio']:7.3f}  [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]  {c}")
    for k, v in mem.items():
        print(f"{k:58s} {v:10.2f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "memory": mem, "seconds": {"wall": times, "cpu": cpu}}, fh, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
