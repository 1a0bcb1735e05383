"""The pack's own small base model family, `synthetic_faces`: what the demo and the shipped adapter run on, since no
real checkpoint or adapter can be downloaded.

A file holds a tiny diffusion model, a word-level text encoder and the codec settings. The diffusion model is one of
two architectures (metadata "architecture"):
- "unet": ComfyUI's UNetModel on SD's discrete schedule, x0 or v prediction as its metadata says;
- "flux": ComfyUI's Flux DiT class (comfy.ldm.flux.model.Flux, through model_base.Flux) at a tiny width, on Flux's
  flow schedule (flow or x0 output): the DiT family of the pack, trained on the same pictures and captions (issue 19).
Everything needed to rebuild the model (network config, vocabulary, codec) is read off the file's metadata.
The three parts are handed to ComfyUI as a ModelPatcher, a real `comfy.sd.CLIP` and a VAE-shaped codec, so ComfyUI's
own CLIPTextEncode, EmptyLatentImage, KSampler, VAEEncode and VAEDecode work with them.
"""
from __future__ import annotations

import json
import re

import torch
from torch import nn

from .adapter import AdapterError, read_safetensors, save_safetensors_atomic

FORMAT = "idfusion.synthetic_model"
FAMILY = "synthetic_faces"


# ---- codec: the VAE slot ------------------------------------------------------------------------
class PixelCodec:
    """IMAGE (B, H, W, 3) in [0, 1] <-> latent (B, 3*f*f, H/8, W/8): the picture average-pooled by `pool`, scaled to
    [-1, 1] and folded by f x f space-to-depth; decoding unfolds and repeats each pixel `pool` times. pool * f = 8,
    so EmptyLatentImage's width/8 gives the right latent size. No learned VAE: for pictures at the model's
    resolution (each pixel repeated `pool` times), decode(encode(x)) == x exactly."""

    def __init__(self, pool: int, factor: int):
        if pool * factor != 8:
            raise AdapterError(f"codec pool {pool} x factor {factor} must be 8 (ComfyUI's latent size is width/8).")
        self.pool, self.factor = pool, factor
        self.downscale_ratio = self.upscale_ratio = 8
        self.latent_channels = 3 * factor * factor
        self.output_channels = 3

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise AdapterError(f"VAE encode expects an IMAGE (batch, height, width, 3), got shape {tuple(pixels.shape)}.")
        h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        if h == 0 or w == 0:
            raise AdapterError(f"The image is {pixels.shape[2]}x{pixels.shape[1]}: this model needs at least 8x8 pixels.")
        y0, x0 = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2   # centre crop to a multiple of 8, as ComfyUI's VAE nodes did
        x = pixels[:, y0:y0 + h, x0:x0 + w, :3].movedim(-1, 1).float()
        if self.pool > 1:
            x = torch.nn.functional.avg_pool2d(x, self.pool)
        return torch.nn.functional.pixel_unshuffle(x * 2.0 - 1.0, self.factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise AdapterError(f"This VAE decodes {self.latent_channels}-channel latents of the synthetic_faces model, "
                               f"got shape {tuple(latent.shape)}: use it with the synthetic model's latents.")
        x = torch.nn.functional.pixel_shuffle(latent.float(), self.factor)
        if self.pool > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=self.pool, mode="nearest")
        return ((x + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)

    # what ComfyUI's tiled VAE nodes ask for; the codec is local, so tiling changes nothing
    def encode_tiled(self, pixels, *args, **kwargs):
        return self.encode(pixels)

    def decode_tiled(self, samples, *args, **kwargs):
        return self.decode(samples)

    def spacial_compression_encode(self):
        return 8

    def spacial_compression_decode(self):
        return 8

    def temporal_compression_decode(self):
        return None

    def temporal_compression_encode(self):
        return None


# ---- text encoder: a real comfy.sd.CLIP around a word-level encoder ------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class WordTokenizer:
    """ComfyUI tokenizer interface over the model's closed vocabulary (read from the model file)."""

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        data = tokenizer_data or {}
        self.vocab = {w: i + 1 for i, w in enumerate(data["vocabulary"])}   # 0 pads
        self.length = int(data["length"])

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        unknown = sorted({w for w in words(text) if w not in self.vocab})
        if unknown:
            raise AdapterError(f"The prompt '{text}' has words the synthetic_faces model does not know: {unknown}. "
                               f"Its vocabulary: {' '.join(sorted(self.vocab))}.")
        ids = [self.vocab[w] for w in words(text)][: self.length]
        ids += [0] * (self.length - len(ids))
        pairs = [(t, 1.0, i + 1) if return_word_ids else (t, 1.0) for i, t in enumerate(ids)]
        return {"words": [pairs]}

    def untokenize(self, token_weight_pair):
        inv = {i: w for w, i in self.vocab.items()}
        return [(p, inv.get(p[0], "")) for p in token_weight_pair]

    def state_dict(self):
        return {}


class WordEncoder(nn.Module):
    """A learned embedding per word plus a learned position (trained with the base model, then frozen)."""

    def __init__(self, vocabulary: int, dim: int, length: int, device=None, dtype=None, **kwargs):
        super().__init__()
        self.emb = nn.Embedding(vocabulary + 1, dim, device=device)
        self.pos = nn.Parameter(torch.randn(length, dim, device=device) * 0.1)
        self.dtypes = {torch.float32}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:   # (B, length) -> (B, length, dim)
        return self.emb(tokens) + self.pos

    # what comfy.sd.CLIP calls on its cond_stage_model
    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        batch = token_weight_pairs["words"]
        tokens = torch.tensor([[p[0] for p in row] for row in batch], device=self.pos.device)
        return self(tokens), None

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=True)


def make_clip(vocabulary: list[str], dim: int, length: int, state: dict | None = None):
    """A real comfy.sd.CLIP (patcher, clone, hooks) around WordEncoder, on the CPU (it is tiny)."""
    import comfy.sd

    class Target:
        params = {"vocabulary": len(vocabulary), "dim": dim, "length": length}
        clip = WordEncoder
        tokenizer = WordTokenizer

    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(Target, tokenizer_data={"vocabulary": vocabulary, "length": length},
                         model_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu,
                                        "dtype": torch.float32})
    if state is not None:
        clip.cond_stage_model.load_state_dict(state, strict=True)
    clip.cond_stage_model.requires_grad_(False).eval()
    return clip


# ---- the diffusion model ----------------------------------------------------------------------------------
def unet_config(latent_channels: int, latent_size: int, channels: int = 64, channel_mult=(1, 2),
                context_dim: int = 64) -> dict:
    """ComfyUI's UNetModel: one level per channel_mult entry, a cross-attention layer after every ResBlock and in
    the middle (so IDFusion patches 2*levels + 1 + levels attn2 layers)."""
    levels = len(channel_mult)
    return {"use_checkpoint": False, "image_size": latent_size, "in_channels": latent_channels,
            "out_channels": latent_channels, "model_channels": channels, "num_res_blocks": [1] * levels,
            "channel_mult": list(channel_mult), "transformer_depth": [1] * levels,
            "transformer_depth_output": [1] * (2 * levels), "transformer_depth_middle": 1,
            "context_dim": context_dim, "num_head_channels": 32, "num_heads": -1,
            "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
            "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False}


def flux_config(latent_channels: int, hidden: int = 128, heads: int = 4, depth: int = 2, depth_single: int = 4,
                context_dim: int = 64, mlp_ratio: float = 4.0) -> dict:
    """ComfyUI's Flux DiT (its FluxParams) at a tiny width. Patch size 1: each latent cell (8x8 pixels) is one image
    token, as the UNet sees it. No guidance embedding (sampled with CFG, as the UNet); vec_in_dim is kept (ComfyUI
    0.3.52's Flux always builds its vector input) and gets zeros, the word encoder having no pooled output. RoPE
    axes split the head width as Flux's own (16, 56, 56) of 128 do: a small time axis, equal height and width."""
    head = hidden // heads
    if hidden % heads or head % 8:
        raise AdapterError(f"Flux width {hidden} with {heads} heads: the head width must be a multiple of 8.")
    hw = (head * 3 // 8) // 2 * 2
    return {"image_model": "flux", "in_channels": latent_channels, "out_channels": latent_channels, "vec_in_dim": 8,
            "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": mlp_ratio, "num_heads": heads,
            "depth": depth, "depth_single_blocks": depth_single, "axes_dim": [head - 2 * hw, hw, hw], "theta": 10000,
            "patch_size": 1, "qkv_bias": True, "guidance_embed": False}


def _pixel_space(channels: int):
    import comfy.latent_formats

    class PixelSpace(comfy.latent_formats.LatentFormat):
        latent_channels = channels

        def __init__(self):
            self.scale_factor = 1.0
    return PixelSpace


def flux_model_config(dit: dict):
    """ComfyUI's own Flux model config class (schnell's: no guidance, flow schedule with shift 1) with pixel-space
    latents: get_model builds model_base.Flux, so every Flux code path of ComfyUI and of the pack runs on it."""
    import comfy.supported_models

    class SyntheticFacesFlux(comfy.supported_models.FluxSchnell):
        unet_config = {}
        latent_format = _pixel_space(dit["in_channels"])
        memory_usage_factor = 1.0
        sampling_settings = {"multiplier": 1.0, "shift": 1.0}

    cfg = SyntheticFacesFlux({**dit, "dtype": torch.float32})
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def model_config(unet: dict):
    """A ComfyUI model config for the family: pixel-space latents (no scaling); build_patcher sets the prediction."""
    import comfy.model_base
    import comfy.supported_models_base

    PixelSpace = _pixel_space(unet["in_channels"])

    class SyntheticFaces(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}      # BASE's default would override num_head_channels
        latent_format = PixelSpace
        memory_usage_factor = 1.0

        def inpaint_model(self):   # BASE reads "more than 4 input channels" as an inpainting UNet
            return False

        def model_type(self, state_dict, prefix=""):
            # the input scaling of every discrete model; build_patcher swaps in x0 sampling where the file says so
            return comfy.model_base.ModelType.V_PREDICTION

    cfg = SyntheticFaces({**unet, "dtype": torch.float32})
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def _x0_sampling(model_config):
    """SD's discrete schedule with an x0 parametrisation (ComfyUI's own ModelSamplingDiscrete and X0 classes): the
    network outputs the clean picture, so an imperfect model blurs where a v/eps model leaves grain."""
    import comfy.model_sampling as cms

    class X0Discrete(cms.ModelSamplingDiscrete, cms.X0):
        pass
    return X0Discrete(model_config)


def _x0_flow_sampling(model_config):
    """Flux's flow schedule (ComfyUI's ModelSamplingFlux and CONST: x_t = sigma * noise + (1 - sigma) * x0) with an x0
    parametrisation, as the UNet's: the network outputs the clean picture. Trained on CPU for minutes, the DiT with
    Flux's own velocity output left every 8x8 token grainy; x0 output blurs instead (measured in the report)."""
    import comfy.model_sampling as cms

    class X0Flow(cms.ModelSamplingFlux, cms.CONST, cms.X0):
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output
    return X0Flow(model_config)


PREDICTIONS = {"unet": ("v", "x0"), "flux": ("flow", "x0")}


def build_patcher(unet: dict, state: dict | None = None, prediction: str = "v", architecture: str = "unet"):
    """BaseModel + ModelPatcher on ComfyUI's devices (the CPU with --cpu). unet: the network's config (unet_config
    or flux_config); state: its weights, or None (random)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    if prediction not in PREDICTIONS.get(architecture, ()):
        raise AdapterError(f"Unknown architecture/prediction {architecture!r}/{prediction!r} (expected one of {PREDICTIONS}).")
    cfg = model_config(unet) if architecture == "unet" else flux_model_config(unet)
    model = cfg.get_model({}, device="cpu")
    if prediction == "x0":
        model.model_sampling = _x0_sampling(cfg) if architecture == "unet" else _x0_flow_sampling(cfg)
    if state is not None:
        model.diffusion_model.load_state_dict(state, strict=True)
    model.diffusion_model.requires_grad_(False).eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# ---- the file ----------------------------------------------------------------------------------------------
CONFIG_KEY = {"unet": "unet_config", "flux": "dit_config"}


def save(path: str, unet: dict, unet_state: dict, text_state: dict, vocabulary: list[str], text_length: int,
         codec: PixelCodec, info: dict, dtype: torch.dtype = torch.float16, architecture: str = "unet"):
    """unet.* (the diffusion model, either architecture) and text.* tensors (fp16 by default) plus everything needed
    to rebuild the model, atomically."""
    tensors = {f"unet.{k}": v.detach().to(dtype).contiguous() for k, v in unet_state.items()}
    tensors.update({f"text.{k}": v.detach().to(dtype).contiguous() for k, v in text_state.items()})
    meta = {"format": FORMAT, "format_version": "1", "family": FAMILY, "architecture": architecture,
            CONFIG_KEY[architecture]: json.dumps({k: v for k, v in unet.items() if k != "dtype"}),
            "text_encoder": json.dumps({"vocabulary": vocabulary, "length": text_length}),
            "codec": json.dumps({"pool": codec.pool, "factor": codec.factor}),
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}}
    save_safetensors_atomic(tensors, path, meta)


def _meta_json(meta: dict, key: str, path: str, kind):
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise AdapterError(f"'{path}' has no '{key}' metadata: it is not a complete synthetic_faces model file; "
                           "rebuild it with `make synthetic`.") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(f"'{path}': metadata '{key}' is not valid JSON ({e}); rebuild the file with `make synthetic`.") from None
    if not isinstance(value, kind):
        raise AdapterError(f"'{path}': metadata '{key}' should be a JSON {kind.__name__}; rebuild the file with `make synthetic`.")
    return value


def load(path: str):
    """-> (ModelPatcher, CLIP, PixelCodec, metadata). Checks the file against its own metadata, naming it on error."""
    tensors, meta = read_safetensors(path, FORMAT, "synthetic_faces model")
    architecture = meta.get("architecture", "unet")   # files from before the DiT family have no such key
    if architecture not in CONFIG_KEY:
        raise AdapterError(f"'{path}': unknown architecture {architecture!r} (this pack knows {sorted(CONFIG_KEY)}); "
                           "update the pack or rebuild the file with `make synthetic`.")
    unet = _meta_json(meta, CONFIG_KEY[architecture], path, dict)
    text = _meta_json(meta, "text_encoder", path, dict)
    codec_meta = _meta_json(meta, "codec", path, dict)
    try:
        codec = PixelCodec(int(codec_meta["pool"]), int(codec_meta["factor"]))
        vocabulary, length = [str(w) for w in text["vocabulary"]], int(text["length"])
        if unet["in_channels"] != codec.latent_channels:
            raise AdapterError(f"'{path}': the network takes {unet['in_channels']} channels but the codec makes "
                               f"{codec.latent_channels}; the file is inconsistent: rebuild it with `make synthetic`.")
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"'{path}': incomplete model metadata ({e!r}); rebuild it with `make synthetic`.") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"'{path}': tensor '{name}' has NaN or Inf values; the file is damaged: rebuild it.")
    prediction = meta.get("prediction", "v")
    if prediction not in PREDICTIONS[architecture]:
        raise AdapterError(f"'{path}': unknown prediction type {prediction!r} for a {architecture} model; rebuild it "
                           "with `make synthetic`.")
    unet_state = {k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")}
    text_state = {k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")}
    _check_config_matches_tensors(unet, architecture, unet_state, path)   # before any real weight is allocated
    try:
        emb = text_state["emb.weight"]
        clip = make_clip(vocabulary, emb.shape[1], length, text_state)
        patcher = build_patcher(unet, unet_state, prediction, architecture)
    except (RuntimeError, KeyError, TypeError) as e:
        raise AdapterError(f"'{path}': its tensors do not match its metadata ({str(e).splitlines()[0][:300]}); "
                           "rebuild it with `make synthetic`.") from None
    if architecture == "flux":
        _check_host_runs_patch_1(patcher, path)
    return patcher, clip, codec, meta


MAX_CONFIG_INT = 1 << 16   # no width, depth or size of this family comes near it


def _check_config_matches_tensors(config: dict, architecture: str, state: dict, path: str):
    """The network the metadata describes, built on the meta device (no memory), must have exactly the file's tensor
    names and shapes: a file whose config claims a far larger network than its tensors is refused before anything is
    allocated. Integers are bounded first so that even the meta build stays small."""
    import comfy.ops

    def ints(v):
        if isinstance(v, bool):
            return
        if isinstance(v, int):
            yield v
        elif isinstance(v, (list, tuple)):
            if len(v) > 64:
                yield len(v) * MAX_CONFIG_INT
            for x in v:
                yield from ints(x)
    if any(abs(i) > MAX_CONFIG_INT for v in config.values() for i in ints(v)):
        raise AdapterError(f"'{path}': its network config has a value over {MAX_CONFIG_INT} (or a list over 64 long); "
                           "the file is damaged or not a synthetic_faces model: rebuild it with `make synthetic`.")
    kw = {k: v for k, v in config.items() if k not in ("dtype", "image_model")}
    try:
        with torch.device("meta"):
            if architecture == "flux":
                from comfy.ldm.flux.model import Flux
                net = Flux(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **kw)
            else:
                from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
                net = UNetModel(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **kw)
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        raise AdapterError(f"'{path}': its network config cannot be built ({str(e).splitlines()[0][:200]}); rebuild it "
                           "with `make synthetic`.") from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise AdapterError(f"'{path}': its tensors do not match its network config (first differences: {diff[:3]}); "
                           "rebuild it with `make synthetic`.")


def _check_host_runs_patch_1(patcher, path: str):
    """The DiT family uses Flux's patch size 1; ComfyUI 0.3.52's Flux folds its output back in fixed 2x2 patches and
    cannot run it. One forward of a 2x2 latent (milliseconds at this width) tells, so the loader can say so plainly."""
    dm = patcher.model.diffusion_model
    x = torch.zeros(1, dm.params.in_channels, 2, 2)
    try:
        with torch.no_grad():
            ok = dm(x, torch.zeros(1), torch.zeros(1, 1, dm.params.context_in_dim)).shape == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        try:
            import comfyui_version
            version = comfyui_version.__version__
        except ImportError:
            version = "an older version"
        raise AdapterError(f"'{path}' is the synthetic_faces DiT (ComfyUI's Flux class at patch size 1), which this "
                           f"ComfyUI ({version}) cannot run: its Flux folds the output in fixed 2x2 patches. Use ComfyUI "
                           "0.3.75 or newer, or the UNet model synthetic_faces.safetensors.")
