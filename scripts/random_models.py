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


# ---- small UNets: the same block layout as the family (layer keys, transformers per block, ADM), narrow ----------
# For tests where the full width is not the point (chaining, masks, cleanup): a forward takes milliseconds and a few
# MB instead of GBs. ComfyUI's own model config class is used, so the family name is the real one ("SD15", "SDXL").
SMALL_UNET_CONFIGS = {
    "SD15": dict(UNET_CONFIGS["SD15"], model_channels=32, context_dim=64, num_heads=4),
    # SDXL's layout (no attention at the top level, 1280-channel-like middle with several transformers) with 2
    # transformers per block instead of 2/10, so (block, number) keys hold several layers as in SDXL
    "SDXL": dict(UNET_CONFIGS["SDXL"], model_channels=32, context_dim=64, num_head_channels=8, adm_in_channels=48,
                 transformer_depth=[0, 0, 2, 2, 2, 2], transformer_depth_middle=2,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 2, 2, 2]),
}


def build_small_model(family: str = "SD15", seed: int = 0, dtype=torch.float32, real_depth: bool = False):
    """A ModelPatcher around a narrow random UNet with the family's block layout, built by ComfyUI's own model
    config class for that family (so model_family() reads it as that family), on the CPU. real_depth=True keeps
    the family's own transformers per block (SDXL: 70 attn2 layers), still narrow."""
    import comfy.model_patcher
    import comfy.supported_models
    cfg = dict(SMALL_UNET_CONFIGS[family], dtype=dtype)
    if real_depth:
        for key in ("transformer_depth", "transformer_depth_middle", "transformer_depth_output"):
            cfg[key] = UNET_CONFIGS[family][key]
    model_config = getattr(comfy.supported_models, family)(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model.to(dtype)
    randomize_(model.diffusion_model, seed)
    model.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


# ---- files ComfyUI's own loaders read: a ControlNet (ControlNetLoader) and a LoRA (LoraLoader) for SD1.5 -----------
def write_controlnet(path: str, seed: int = 0, zero_conv_scale: float = 0.1, dtype=torch.float16):
    """A random-weight SD1.5 ControlNet built from ComfyUI's own comfy.cldm.cldm.ControlNet with the UNet config
    ComfyUI detects for SD1.5, saved in the original ControlNet layout ("control_model." keys) that
    comfy.controlnet.load_controlnet detects. Its zero convolutions are random but small (zero_conv_scale), so the
    control changes the image without swamping it. Written atomically."""
    import os
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    import comfy.utils
    cfg = dict(comfy.model_detection.model_config_from_unet_config(unet_config("SD15")).unet_config)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    net = randomize_(comfy.cldm.cldm.ControlNet(**cfg), seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out")):
                p.mul_(zero_conv_scale)
    sd = {f"control_model.{k}": v.to(dtype).contiguous() for k, v in net.state_dict().items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    return path


def write_lora(path: str, seed: int = 0, rank: int = 4, targets=("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")):
    """A random LoRA for SD1.5's UNet in the kohya layout ComfyUI's LoraLoader reads (lora_unet_<key>.lora_up /
    .lora_down / .alpha), keys taken from ComfyUI's own comfy.lora.model_lora_keys_unet on the SD1.5 module tree
    (meta device, no weights). Written atomically."""
    import os
    import comfy.lora
    import comfy.utils
    model = build_model("SD15", device="meta").model
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd, done = {}, set()
    for lora_key, model_key in comfy.lora.model_lora_keys_unet(model, {}).items():
        if not isinstance(model_key, str) or not lora_key.startswith("lora_unet_") or model_key in done or not model_key.endswith(
                tuple(f"{t}.weight" for t in targets)):
            continue  # the key map also lists diffusers-style names for the same weights: one entry per weight
        done.add(model_key)
        out_f, in_f = shapes[model_key]
        sd[f"{lora_key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).half()
        sd[f"{lora_key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) / rank ** 0.5).half()
        sd[f"{lora_key}.alpha"] = torch.tensor(float(rank)).half()
    if not sd:
        raise RuntimeError("no LoRA targets found in the SD1.5 UNet: ComfyUI's key map changed")
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    return path


# ---- SDXL as separate files (UNet, CLIP-L, CLIP-G, VAE), written one tensor at a time ---------------------------
# A full SDXL checkpoint loads as a 10 GB fp32 UNet on the CPU. As separate files it goes through the loaders users
# pick on small machines: UNETLoader with weight_dtype fp8_e5m2 (2.6 GB in memory, computed in fp32 by ComfyUI's
# manual cast; e5m2 casts to fp32 twice as fast as e4m3fn on the CPU), DualCLIPLoader type sdxl and VAELoader. The
# writers stream each tensor to disk, so they never hold more than one tensor in fp32.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors_streaming(path: str, shapes: dict, make, dtype, metadata: dict | None = None):
    """A .safetensors file of tensors `shapes` (name -> shape), each made by make(name, shape) (float32) and cast
    to `dtype`, written one at a time (header first: its offsets follow from the shapes). Atomic."""
    import json
    import os
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * item
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name, shape in shapes.items():
                t = make(name, tuple(shape)).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: made {tuple(t.shape)}, declared {tuple(shape)}")
                f.write(t.view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _random_tensor(name: str, shape: tuple, seed: int, embedding_std: float | None = None):
    """randomize_'s rule for one tensor, seeded per tensor (so tensors can be made in any order): fan-in scaled
    weights, zero biases, unit scales; embeddings get std `embedding_std` when given (as _tame_clip leaves them)."""
    if len(shape) >= 2:
        g = torch.Generator().manual_seed(seed)
        std = embedding_std if embedding_std is not None and "embedding" in name else 1.0 / math.sqrt(math.prod(shape[1:]))
        return torch.empty(shape).normal_(0.0, std, generator=g)
    if name.split(".")[-1].endswith("bias"):
        return torch.zeros(shape)
    return torch.ones(shape)


def write_sdxl_unet(path: str, seed: int = 0, dtype=torch.float8_e5m2):
    """A random full-width SDXL UNet (ComfyUI's SDXL config: 320 channels, 2048 context, 2/10 transformers per
    block, 2816 ADM inputs; 2.57 G parameters) in the diffusion_models layout UNETLoader reads. fp8 by default:
    2.6 GB on disk and in memory when loaded with weight_dtype fp8_e5m2."""
    shapes = {k: tuple(v.shape) for k, v in build_model("SDXL", device="meta").model.diffusion_model.state_dict().items()}
    index = {k: i for i, k in enumerate(shapes)}
    return write_safetensors_streaming(path, shapes, lambda n, s: _random_tensor(n, s, seed * 100003 + index[n]), dtype)


def sdxl_text_encoder_shapes():
    """{"l": {key: shape}, "g": {key: shape}}: SDXL's CLIP-L and CLIP-G as ComfyUI builds them (comfy.sdxl_clip,
    on the meta device: no weights), in the key layout of standalone text encoder files."""
    import comfy.sdxl_clip
    with torch.device("meta"):
        model = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    return {part: {k: tuple(v.shape) for k, v in getattr(model, f"clip_{part}").transformer.state_dict().items()}
            for part in ("l", "g")}


def write_sdxl_text_encoders(path_l: str, path_g: str, seed: int = 0, dtype=torch.float16):
    """Random CLIP-L and CLIP-G files (text_encoders folder) that DualCLIPLoader(type sdxl) loads; embeddings with
    std 0.02 as _tame_clip leaves them, so random text features stay finite."""
    for part, path, s in (("l", path_l, seed + 1), ("g", path_g, seed + 2)):
        shapes = sdxl_text_encoder_shapes()[part]
        index = {k: i for i, k in enumerate(shapes)}
        write_safetensors_streaming(path, shapes, lambda n, sh, index=index, s=s: _random_tensor(
            n, sh, s * 100003 + index[n], embedding_std=0.02), dtype)
    return path_l, path_g


def write_vae(path: str, seed: int = 0, dtype=torch.float16):
    """A random SD-family VAE (SD1.5 and SDXL share the architecture) in the layout VAELoader reads. Atomic."""
    import os
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = randomize_(AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4), seed)
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file({k: v.to(dtype).contiguous() for k, v in ae.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path
