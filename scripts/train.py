"""Train an IDFusion adapter from the command line: CPU, one GPU, or several under torchrun / accelerate launch.

    python scripts/train.py --checkpoint sd15.safetensors --data faces/ --out runs/ --name me --steps 2000
    torchrun --nproc_per_node 2 scripts/train.py ...      # DDP (nccl on GPU, gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...   # accelerate starts it through torchrun

Only Linear_kf / Linear_vf train. A run resumes from <out>/<name>.train-state.safetensors when it exists
(pass --fresh to start over). The adapter (<out>/<name>.safetensors) goes in ComfyUI/models/idfusion.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pack(comfyui: str, cpu: bool):
    sys.path.insert(0, comfyui)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    if "idfusion_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("idfusion_pack", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["idfusion_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["idfusion_pack"]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse(argv=None):
    """Two stages: --comfyui/--cpu first (the pack imports ComfyUI), then every TrainConfig field as a flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    pre.add_argument("--cpu", action="store_true", help="force the CPU")
    known, _ = pre.parse_known_args(argv)
    import torch
    known.cpu = known.cpu or not torch.cuda.is_available()
    load_pack(known.comfyui, known.cpu)
    from idfusion_pack.idfusion.train import TrainConfig
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre])
    ap.add_argument("--checkpoint", required=True, help="SD1.5/SDXL checkpoint (.safetensors) with UNet, CLIP and VAE")
    ap.add_argument("--data", required=True, help="dataset folder (images + .txt captions, optional identity subfolders and *_mask.png)")
    ap.add_argument("--out", required=True, help="output folder for the adapter, training state and loss curve")
    ap.add_argument("--name", default="idfusion_adapter")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--reference-resolution", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing training state and start over")
    for f in dataclasses.fields(TrainConfig):
        kind = _bool if isinstance(f.default, bool) else type(f.default)  # bool("false") would be True
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = ap.parse_args(argv)
    args.cpu = known.cpu
    return args, TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def main(argv=None):
    args, cfg = parse(argv)
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not args.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if args.cpu else "nccl")
    import comfy.sd
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import Trainer
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
    ds = FaceDataset(args.data, args.resolution, args.reference_resolution)
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(model, clip, vae, ds, args.out, args.name, cfg)
    if args.fresh and trainer.rank == 0 and os.path.exists(trainer.state_path):
        os.remove(trainer.state_path)
    if world > 1:
        dist.barrier()
    trainer.resume()
    rank0 = trainer.rank == 0
    if rank0:
        print(f"IDFusion training '{args.name}': {len(ds)} images ({len(ds.skipped)} skipped), {world} process(es), "
              f"from step {trainer.step} to {cfg.steps}", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not rank0, unit="step")
    t0 = time.time()

    def on_step(step, loss):
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

    path = trainer.run(on_step=on_step)
    bar.close()
    if rank0:
        print(f"adapter: {path}\nstate: {trainer.state_path}\nloss curve: {os.path.join(args.out, args.name + '.loss.png')}"
              f"\n{cfg.steps} steps, {time.time() - t0:.1f}s, final loss {trainer.losses[-1][1]:.5f}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
