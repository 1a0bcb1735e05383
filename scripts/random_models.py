"""Random-weight models built from ComfyUI's own classes, at full channel width, for tests, the demo and
benchmarks. No weights can be downloaded here, so the real loading paths are exercised on these."""
from __future__ import annotations

import math

import torch

# ComfyUI's own UNet configs for these families (comfy/model_detection.py, unet_config_from_diffusers_unet)
UNET_CONFIGS = {
    "SD15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "SDXL": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0):
    """ComfyUI builds layers without initialising them; give every parameter a sane random value
    (fan-in scaled weights, zero biases, unit norm scales) so activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith("bias") or "bias" in name.split(".")[-1]:
            p.zero_()
        else:
            p.fill_(1.0)
    return module


def unet_config(family: str, dtype=torch.float32):
    cfg = dict(UNET_CONFIGS[family])
    cfg["dtype"] = dtype
    return cfg


def build_model(family: str = "SD15", dtype=torch.float32, seed: int = 0, device: str = "cpu"):
    """A ComfyUI ModelPatcher around a random-weight UNet of the family, on the CPU. device="meta" gives the
    same module tree without weights (instant), for tests that only read the model's structure."""
    import comfy.model_detection
    import comfy.model_patcher
    cfg = unet_config(family, dtype)
    model_config = comfy.model_detection.model_config_from_unet_config(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    if device == "meta":
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    model.diffusion_model.to(dtype)
    randomize_(model.diffusion_model, seed)
    model.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


def build_vae(seed: int = 0):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    randomize_(ae, seed)
    return comfy.sd.VAE(sd=ae.state_dict())


def build_clip(seed: int = 0):
    """A ComfyUI CLIP object (SD1.5's CLIP-L text encoder and tokenizer) with random weights, on the CPU."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu, "dtype": torch.float32})
    _tame_clip(randomize_(clip.cond_stage_model, seed))
    return clip


@torch.no_grad()
def _tame_clip(clip_model):
    """Keep CLIP's token/position embeddings small so random text features stay finite."""
    for n, p in clip_model.named_parameters():
        if "embedding" in n:
            p.mul_(0.02 * math.sqrt(p.shape[-1]))
    return clip_model


def write_checkpoint(path: str, seed: int = 0, dtype=torch.float16):
    """A random SD1.5-shaped checkpoint (UNet + CLIP-L text encoder + VAE) in the layout
    CheckpointLoaderSimple reads, saved with ComfyUI's own state_dict_for_saving."""
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL
    cfg = unet_config("SD15", torch.float32)
    model_config = comfy.model_detection.model_config_from_unet_config(cfg)
    model = model_config.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed)
    clip = _tame_clip(randomize_(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32), seed + 1))
    ae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    randomize_(ae, seed + 2)
    sd = model.state_dict_for_saving(clip.state_dict(), ae.state_dict(), None)
    sd = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path)
    return path


def sampler_transformer_options(model_patcher, cond_or_uncond):
    """transformer_options as ComfyUI's sampler builds them for one apply_model call: the ModelPatcher's
    model_options plus its wrappers (comfy/sampler_helpers.py merges them the same way) and the CFG layout."""
    import comfy.patcher_extension
    to = dict(model_patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = {}
    comfy.patcher_extension.merge_nested_dicts(to["wrappers"], model_patcher.wrappers, copy_dict1=False)
    to["cond_or_uncond"] = list(cond_or_uncond)
    return to
