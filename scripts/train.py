"""Train an IDFusion adapter from the command line: CPU, one GPU, or several under torchrun / accelerate launch.

    python scripts/train.py --checkpoint sd15.safetensors --data faces/ --out runs/ --name me --steps 2000
    python scripts/train.py --unet flux1-dev.safetensors --clip clip_l.safetensors t5xxl_fp16.safetensors \
        --vae ae.safetensors --data faces/ --out runs/ --name me_flux     # Flux (DiT): separate files, as ComfyUI loads them
    torchrun --nproc_per_node 2 scripts/train.py ...      # DDP (nccl on GPU, gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...   # accelerate starts it through torchrun

The model comes either from one checkpoint (--checkpoint: SD1.5/SDXL, as Load Checkpoint) or from separate files as
Flux ships (--unet: a diffusion_models file, as Load Diffusion Model / UNETLoader; --clip: one or two text encoder files
with --clip-type, as Load CLIP / DualCLIPLoader; --vae: as Load VAE). The same Trainer trains either family.
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


WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}  # UNETLoader's choices


def check_sources(ap, args):
    """One source of model, text encoder and VAE: --checkpoint, or --unet with --clip and --vae. Refused here, before
    anything is loaded, with what to pass instead; every named file must exist."""
    separate = {"--unet": args.unet, "--clip": args.clip, "--vae": args.vae}
    given = [k for k, v in separate.items() if v]
    if args.checkpoint and given:
        ap.error(f"--checkpoint holds the model, text encoder and VAE; {', '.join(given)} load them from separate files "
                 "instead (Flux and other diffusion_models files). Pass --checkpoint alone, or --unet, --clip and --vae.")
    if not args.checkpoint and not given:
        ap.error("no model: pass --checkpoint (SD1.5/SDXL checkpoint), or --unet, --clip and --vae (Flux: the "
                 "diffusion_models file, its text encoders, its VAE).")
    if given and len(given) < 3:
        missing = [k for k, v in separate.items() if not v]
        ap.error(f"{', '.join(given)} without {', '.join(missing)}: a diffusion_models file has no text encoder or VAE, "
                 "so pass all three (--unet, --clip FILE [FILE], --vae).")
    if args.clip_type is not None and not args.clip:
        ap.error("--clip-type goes with --clip")
    if args.weight_dtype != "default" and not args.unet:
        ap.error("--weight-dtype goes with --unet (a checkpoint keeps its own dtype)")
    if args.clip:
        import comfy.sd
        if len(args.clip) > 2:
            ap.error(f"--clip takes one or two text encoder files (as CLIPLoader/DualCLIPLoader), got {len(args.clip)}")
        args.clip_type = args.clip_type or ("flux" if len(args.clip) == 2 else "stable_diffusion")
        types = [t.name.lower() for t in comfy.sd.CLIPType]
        if args.clip_type.lower() not in types:
            ap.error(f"--clip-type {args.clip_type!r} is not one this ComfyUI knows: {', '.join(types)}")
    for flag, paths in (("--checkpoint", [args.checkpoint]), ("--unet", [args.unet]), ("--clip", args.clip or []),
                        ("--vae", [args.vae])):
        for p in paths:
            if p and not os.path.isfile(p):
                ap.error(f"{flag} {p}: no such file")


def load_models(args):
    """(MODEL, CLIP, VAE) as ComfyUI's loader nodes build them: Load Checkpoint, or UNETLoader + CLIPLoader /
    DualCLIPLoader + VAELoader (the same comfy.sd calls, with the nodes' options)."""
    import comfy.sd
    import comfy.utils
    import torch
    if args.checkpoint:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
        return model, clip, vae
    options = {"dtype": getattr(torch, WEIGHT_DTYPES[args.weight_dtype])} if WEIGHT_DTYPES[args.weight_dtype] else {}
    model = comfy.sd.load_diffusion_model(args.unet, model_options=options)
    if model is None:  # 0.3.52 returns None for a file it cannot detect; newer hosts raise
        raise SystemExit(f"--unet {args.unet}: ComfyUI does not recognise this diffusion model file")
    clip = comfy.sd.load_clip(ckpt_paths=list(args.clip), clip_type=comfy.sd.CLIPType[args.clip_type.upper()])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae))
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return model, clip, vae


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
    ap.add_argument("--checkpoint", help="SD1.5/SDXL checkpoint (.safetensors) with UNet, CLIP and VAE (or use --unet/--clip/--vae)")
    ap.add_argument("--unet", help="a diffusion model alone (ComfyUI/models/diffusion_models, e.g. flux1-dev.safetensors), "
                                   "loaded as UNETLoader does; needs --clip and --vae")
    ap.add_argument("--weight-dtype", default="default", choices=list(WEIGHT_DTYPES), help="--unet's weights, as UNETLoader's weight_dtype")
    ap.add_argument("--clip", nargs="+", metavar="FILE", help="text encoder file(s) for --unet (ComfyUI/models/text_encoders): "
                                                             "Flux takes clip_l and t5xxl, as DualCLIPLoader")
    ap.add_argument("--clip-type", default=None, help="how --clip's files are combined, as CLIPLoader/DualCLIPLoader's type "
                                                      "(flux, sd3, stable_diffusion, ...); default: flux for two files, "
                                                      "stable_diffusion for one")
    ap.add_argument("--vae", help="VAE file for --unet (ComfyUI/models/vae, e.g. Flux's ae.safetensors)")
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
    check_sources(ap, args)
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
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import Trainer
    model, clip, vae = load_models(args)
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
