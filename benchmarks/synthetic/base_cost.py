"""What a wider synthetic base, or a smaller token, costs (issue 17): parameters, fp16 size, and one training step's
time (forward and backward at batch 16) for first-level / second-level widths on the shipped 8 x 8 token (a 12 x 12 x
192 latent) and on a 4 x 4 token (codec pool 2, factor 4: a 24 x 24 x 48 latent of the same 96 px face), as ratios to
the shipped 64 / 128 on 8 x 8, measured in one run on this machine.

    .hosts/0.3.75/venv/bin/python benchmarks/synthetic/base_cost.py [--threads 2]
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]
# (token side, first-level channels, channel_mult)
WIDTHS = [(8, 64, (1, 2)), (8, 128, (1, 1)), (8, 96, (1, 2)), (8, 128, (1, 2)), (8, 192, (1, 1)),
          (4, 64, (1, 2)), (4, 64, (1, 2, 2))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from train import load_pack
    load_pack(args.comfyui, cpu=True)
    import domain as D
    from idfusion_pack.idfusion import synthetic
    rows = []
    for factor, channels, mult in WIDTHS:
        side = D.SIZE // factor
        model = synthetic.build_patcher(synthetic.unet_config(3 * factor ** 2, side, channels, mult), prediction="x0").model
        params = list(model.diffusion_model.parameters())
        for p in params:
            p.requires_grad_(True)
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(16, 3 * factor ** 2, side, side, generator=g), torch.randn(16, 16, 64, generator=g)
        sigma = torch.rand(16, generator=g) + 0.1
        times = []
        for _ in range(6):   # the first two warm up
            t0 = time.perf_counter()
            model.apply_model(x, sigma, c_crossattn=ctx).square().mean().backward()
            times.append(time.perf_counter() - t0)
        rows.append((f"{factor} x {factor}", " / ".join(str(channels * m) for m in mult), sum(p.numel() for p in params),
                     sum(times[2:]) / 4))
    n0, t0 = rows[0][2], rows[0][3]
    print("| token | widths | parameters | fp16 MB | step time, ratio to 8 x 8, 64 / 128 |\n|---|---|---|---|---|")
    for token, name, n, t in rows:
        print(f"| {token} | {name} | {n / 1e6:.1f} M ({n / n0:.2f}x) | {2 * n / 1e6:.1f} | {t / t0:.2f}x |")
    print(f"(8 x 8, 64 / 128: {t0:.3f} s per step here, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
