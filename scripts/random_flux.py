"""Random-weight Flux models built from ComfyUI's own classes (comfy.ldm.flux.model.Flux through
comfy.supported_models.Flux / FluxSchnell / Flux2), for tests and benchmarks. No weights can be downloaded here.

- build_small_flux: a narrow Flux (or schnell, or Flux 2) in memory, for exactness and chaining tests.
- write_flux_unet: a Flux-dev-width file (hidden 3072, 24 heads, Flux's RoPE axes) with few blocks, in the
  diffusion_models layout UNETLoader detects as Flux, written one tensor at a time (random_models' streaming writer).
  Its text input is CLIP-L's width (768 tokens and pooled) instead of T5-XXL's 4096: T5-XXL alone is 4.7 G
  parameters, far over the test machine's budget, and the model's blocks do not depend on the text width.
- write_flux_vae: Flux's 16-channel VAE architecture (ComfyUI's AutoencoderKL), random.
- write_clip_l: a random CLIP-L text encoder file (CLIPLoader type stable_diffusion)."""
from __future__ import annotations

import torch

import random_models as rm

SMALL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 48,
         "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
         "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
# ComfyUI's detected Flux dev config (comfy/model_detection.py) with few blocks and CLIP-L's text width
DEV_WIDTH = dict(SMALL, hidden_size=3072, num_heads=24, mlp_ratio=4.0, axes_dim=[16, 56, 56], context_in_dim=768,
                 vec_in_dim=768, depth=2, depth_single_blocks=4)
FLUX_VAE_DDCONFIG = dict(rm.VAE_DDCONFIG, z_channels=16)


def flux_config(kind: str = "dev", **overrides) -> dict:
    cfg = dict(SMALL, **overrides)
    if kind == "schnell":
        cfg["guidance_embed"] = False
    elif kind == "flux2":  # Flux 2's layout: global modulation, 4 RoPE axes, no biases, patch 1
        cfg.update(image_model="flux2", axes_dim=[4, 4, 4, 4], global_modulation=True, vec_in_dim=None,
                   mlp_silu_act=True, qkv_bias=False, ops_bias=False, patch_size=1, out_channels=16,
                   default_ref_method="index", ref_index_scale=10.0, guidance_embed=True)
    return cfg


def build_small_flux(kind: str = "dev", seed: int = 0, dtype=torch.float32, **overrides):
    """A ModelPatcher around a narrow random Flux built by ComfyUI's own model config class for the kind
    (Flux, FluxSchnell, Flux2), on the CPU."""
    import comfy.model_patcher
    import comfy.supported_models
    cls = {"dev": comfy.supported_models.Flux, "schnell": comfy.supported_models.FluxSchnell,
           "flux2": getattr(comfy.supported_models, "Flux2", None)}[kind]
    if cls is None:
        raise RuntimeError(f"this ComfyUI has no {kind} model class")
    config = cls(flux_config(kind, **overrides))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="cpu")
    model.diffusion_model.to(dtype)
    rm.randomize_(model.diffusion_model, seed)
    model.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


def flux_unet_shapes(cfg: dict) -> dict:
    """{key: shape} of ComfyUI's Flux with this config, built on the meta device (no weights)."""
    import comfy.ldm.flux.model
    import comfy.ops
    kw = {k: v for k, v in cfg.items() if k != "image_model"}
    with torch.device("meta"):
        net = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **kw)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def write_flux_unet(path: str, seed: int = 0, dtype=torch.bfloat16, cfg: dict | None = None):
    """A random Flux-dev-width DiT (DEV_WIDTH: 2 double + 4 single blocks at 3072, 24 heads; 1.29 G parameters) in
    the diffusion_models layout UNETLoader detects as Flux, streamed to disk one tensor at a time."""
    shapes = flux_unet_shapes(cfg or DEV_WIDTH)
    index = {k: i for i, k in enumerate(shapes)}
    return rm.write_safetensors_streaming(path, shapes, lambda n, s: _flux_tensor(n, s, seed * 100003 + index[n]), dtype)


def _flux_tensor(name, shape, seed):
    t = rm._random_tensor(name, shape, seed)
    if ".mod.lin." in name or "modulation.lin." in name or name.startswith("final_layer.adaLN"):
        t = t * 0.1  # small modulation: scale/shift/gate near (0, 0, 0.1) as in trained DiTs, so 6 blocks stay finite
    return t


def write_flux_vae(path: str, seed: int = 0, dtype=torch.float16):
    """A random VAE with Flux's 16 latent channels (ComfyUI's AutoencoderKL), in the layout VAELoader reads. Atomic."""
    import os
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = rm.randomize_(AutoencoderKL(ddconfig=FLUX_VAE_DDCONFIG, embed_dim=16), seed)
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file({k: v.to(dtype).contiguous() for k, v in ae.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def write_clip_l(path: str, seed: int = 0, dtype=torch.float16):
    """A random CLIP-L text encoder (text_encoders folder; CLIPLoader type stable_diffusion), embeddings tamed."""
    shapes = rm.sdxl_text_encoder_shapes()["l"]
    index = {k: i for i, k in enumerate(shapes)}
    return rm.write_safetensors_streaming(path, shapes, lambda n, s: rm._random_tensor(
        n, s, seed * 100003 + index[n], embedding_std=0.02), dtype)
