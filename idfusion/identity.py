"""Reference encoding: a face image goes through the same UNet and every attn2 layer's input h_f is
recorded (paper Fig. 2). An Identity holds h_f per reference and per layer, and its .safetensors format.

Two file formats (both load):
- version 2 (default, small): per reference only the clean latent and a thumbnail, plus the text context of the
  reference pass. h_f is recomputed with one reference pass through the model the identity is applied to
  (`Identity.for_model`): about 0.3 MB for a 512² SD1.5 reference instead of 46 MB, and one file serves every
  checkpoint of its family.
- version 1: h_f stored for every layer (fp32), as older versions of the pack wrote it."""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field

import torch

from .adapter import (AdapterError, FLOAT_DTYPES, FileProblem, Layer, _Bad, attn2_modules, check_layers,
                      check_tensor_headers, check_values, find_layers, model_family, parse_encoding, parse_family,
                      parse_layers, read_header, read_tensors, save_safetensors_atomic)

IDENTITY_FORMAT = "idfusion.identity"
WITH_H_F, COMPACT = 1, 2  # identity format versions: h_f stored / only what recomputes it
THUMBNAIL = 64            # longest side of the reference thumbnail kept in the file, in pixels
MAX_REFERENCES = 256
MAX_LATENT_SIDE = 512     # a 4096 px reference for SD-style VAEs; bounds the reference pass a file can ask for
# The reference pass's cost is decided by the latent's positions: self-attention at the highest-resolution layers
# grows with their square. 128x128 = 16384 positions is SDXL's native 1024 px reference (and 1024 px for SD1.5),
# the largest a supported family encodes at its own resolution; a 256x256 latent costs 16x that in attention
# (measured in tests/test_hostile_inputs.py's notes and the README's Security model).
MAX_LATENT_TOKENS = 128 * 128
MAX_TOTAL_TOKENS = 4 * MAX_LATENT_TOKENS  # all references of one identity: keys at every layer, every step
MAX_CONTEXT_TOKENS = 77 * 32              # the reference pass's text (ComfyUI's long prompts are 77-token chunks)
MAX_ACTIVATION = 1e6      # |h_f|, context and latents of a real model stay far below this (fp16 tops out at 65504)


@dataclass
class Identity:
    """One person: h_f for each reference image (Eq. 6 concatenates them), plus what produced them."""
    layers: list[Layer]
    family: str
    encoding: dict                      # {"mode": "cached"|"per_step", "timestep": int, "text": "zeros"|"empty"}
    h_f: list                           # per reference: layer.name -> (N_f, C) float32 on the CPU, or None when
                                        # the file had only the latent (for_model computes it)
    latents: list[torch.Tensor]         # per reference: clean model-space latent (1, c, h, w): the reference pass's input
    context: torch.Tensor               # (1, N_c, ctx) text context of the reference pass
    y: torch.Tensor | None = None       # (1, adm) for models with ADM (SDXL), else None
    name: str = "identity"
    _uid: int = field(default=0, repr=False)
    # per reference: a small uint8 (h, w, 3) picture of it (longest side <= THUMBNAIL), or None (older files)
    thumbnails: list = field(default_factory=list)
    # identities with h_f computed by for_model: [(weakref to the BaseModel, its weight patches' uuid, Identity)]
    _computed: list = field(default_factory=list, repr=False, compare=False)
    source: str = ""                    # the file it was loaded from (for messages), "" when encoded in this run

    @property
    def label(self) -> str:
        """How messages name it: its name, and its file when it came from one."""
        return f"'{self.name}'" + (f" (file '{self.source}')" if self.source else "")

    def thumbnail(self, r: int):
        return self.thumbnails[r] if r < len(self.thumbnails) else None

    @property
    def references(self) -> int:
        return len(self.latents)

    def check_model(self, model_patcher, mode: str | None = None):
        """Raise a clear AdapterError naming the identity and its file unless it fits the model: its layers, and when a
        reference pass will run (a compact file, or per_step mode) the pass's inputs: latent channels and size, the
        text context's width and the ADM vector y. Cheap: shapes only, before any pass or allocation."""
        check_layers(self.layers, self.family, model_patcher, "Identity", self.label)
        if mode == "per_step" or any(h is None for h in self.h_f):
            check_reference_pass(self, model_patcher, per_step=(mode == "per_step"))

    def for_model(self, model_patcher) -> "Identity":
        """This identity with h_f for every reference. A reference loaded without h_f (format 2) gets it from one
        reference pass of its stored latent through model_patcher's UNet, with the stored context and timestep: what
        Encode Reference Face computed. Kept per model and weight patches (LoRA), so a cached Load Identity pays the
        pass once; only the latest two are kept (h_f of a 512² reference is ~46 MB)."""
        missing = [r for r, h in enumerate(self.h_f) if h is None]
        if not missing:
            return self
        uuid = getattr(model_patcher, "patches_uuid", None)
        for ref, patches, done in self._computed:
            if ref() is model_patcher.model and patches == uuid:
                return done
        self.check_model(model_patcher)
        base = model_patcher.model
        sigma = reference_sigma(model_patcher, self.encoding.get("timestep", 0))
        h_f = list(self.h_f)
        for r in missing:
            h_f[r] = reference_h_f(model_patcher, self.layers, self.latents[r], sigma, self.context, self.y)
        done = Identity(self.layers, self.family, self.encoding, h_f, self.latents, self.context, self.y, self.name,
                        thumbnails=self.thumbnails, source=self.source)
        self._computed = [e for e in self._computed if e[0]() is not None][-1:] + [(weakref.ref(base), uuid, done)]
        return done

    def save(self, path: str, with_h_f: bool = False):
        """Format 2 (latents, context, thumbnails; h_f is recomputed when applied), or format 1 with every layer's
        h_f (with_h_f=True: large, but readable by older versions of the pack)."""
        tensors = {"context": self.context}
        if self.y is not None:
            tensors["y"] = self.y
        if with_h_f and any(h is None for h in self.h_f):
            raise AdapterError(f"Identity '{self.name}' has no h_f yet (it was loaded from a compact file): apply it to a "
                               f"model first, or save it in the compact format.")
        for r, lat in enumerate(self.latents):
            tensors[f"ref{r}.latent"] = lat
            if with_h_f:
                for l in self.layers:
                    tensors[_h_f_key(r, l)] = self.h_f[r][l.name]
            if self.thumbnail(r) is not None:
                tensors[f"ref{r}.thumbnail"] = self.thumbnail(r)
        meta = {"format": IDENTITY_FORMAT, "format_version": str(WITH_H_F if with_h_f else COMPACT),
                "base_family": self.family, "layers": json.dumps([l.to_json() for l in self.layers]),
                "encoding": json.dumps(self.encoding), "references": str(self.references), "name": self.name}
        save_safetensors_atomic(tensors, path, meta)

    @classmethod
    def load(cls, path: str):
        """Read and check an identity file: metadata against tensor headers first (nothing allocated), then values."""
        fname = os.path.basename(path)
        bad = FileProblem("Identity", fname, "encode the reference again (IDFusion Encode Reference Face) and save it, "
                                             "or delete the file from models/idfusion/identities")
        shapes, meta = read_header(path, IDENTITY_FORMAT, "identity", newest=COMPACT)
        stores_h_f = int(meta["format_version"]) == WITH_H_F
        layers = bad.check(parse_layers, meta.get("layers"))
        encoding = bad.check(parse_encoding, meta.get("encoding"), "encoding")
        family = bad.check(parse_family, meta.get("base_family"))
        n = meta.get("references", "")
        if not (n.isascii() and n.isdigit()) or not 1 <= int(n) <= MAX_REFERENCES:
            raise bad.error(f"its 'references' metadata is {n!r}, not a count from 1 to {MAX_REFERENCES}")
        n = int(n)
        name = meta.get("name", os.path.splitext(fname)[0])
        if not name or len(name) > 200 or not name.isprintable():
            raise bad.error("its 'name' metadata is empty, too long or has control characters")
        bad.check(lambda: check_tensor_headers(shapes, *_identity_spec(shapes, layers, n, stores_h_f)))
        tensors = {}
        for k, t in read_tensors(path, list(shapes), "identity"):
            bad.check(check_values, k, t, MAX_ACTIVATION)
            tensors[k] = t
        h_f = [{l.name: tensors[_h_f_key(r, l)].float() for l in layers} if stores_h_f else None for r in range(n)]
        latents = [tensors[f"ref{r}.latent"].float() for r in range(n)]
        thumbs = [tensors.get(f"ref{r}.thumbnail") for r in range(n)]
        return cls(layers, family, encoding, h_f, latents, tensors["context"].float(),
                   tensors["y"].float() if "y" in tensors else None, name,
                   thumbnails=thumbs if any(t is not None for t in thumbs) else [], source=fname)


def _h_f_key(r: int, layer: Layer) -> str:
    return f"ref{r}.{'.'.join(str(x) for x in layer.key)}.h_f"


def _identity_spec(shapes: dict, layers: list[Layer], n: int, stores_h_f: bool = True):
    """What an identity file with n references for these layers must (and may) hold: (expected, optional)."""
    def rank(k):
        return lambda s: None if len(s) == k and all(d >= 1 for d in s) and s[0] == 1 else f"expected (1, ...) with {k} dimensions"

    def context_shape(s):
        problem = rank(3)(s)
        return problem or (None if s[1] <= MAX_CONTEXT_TOKENS else f"expected at most {MAX_CONTEXT_TOKENS} text tokens")

    def latent_shape(s):
        if len(s) != 4 or s[0] != 1 or min(s) < 1:
            return "expected (1, channels, height, width)"
        if max(s[2:]) > MAX_LATENT_SIDE:
            return f"expected height and width of at most {MAX_LATENT_SIDE}"
        return None if s[2] * s[3] <= MAX_LATENT_TOKENS else \
            f"{s[2] * s[3]} latent positions, more than the {MAX_LATENT_TOKENS} (128x128, a 1024 px reference) a reference pass may take"

    def thumb(s):
        ok = len(s) == 3 and s[2] == 3 and 1 <= s[0] <= THUMBNAIL and 1 <= s[1] <= THUMBNAIL
        return None if ok else f"expected (h, w, 3) with h, w at most {THUMBNAIL}"

    total = sum(_positions(shapes.get(f"ref{r}.latent", ((),))[0]) for r in range(n))
    if total > MAX_TOTAL_TOKENS:
        raise _Bad(f"its {n} references hold {total} latent positions together, more than the {MAX_TOTAL_TOKENS} one "
                   f"identity may attend to at every layer and step")
    expected = {"context": (context_shape, FLOAT_DTYPES)}
    optional = {"y": (rank(2), FLOAT_DTYPES)}
    for r in range(n):
        latent = shapes.get(f"ref{r}.latent", ((),))[0]
        tokens = latent[2] * latent[3] if len(latent) == 4 else 0
        expected[f"ref{r}.latent"] = (latent_shape, FLOAT_DTYPES)
        for l in (layers if stores_h_f else []):
            # h_f of a layer has one token per latent position at most (lower UNet levels have fewer)
            def h_f(s, c=l.channels, t=tokens):
                return None if len(s) == 2 and s[1] == c and 1 <= s[0] <= max(t, 1) else \
                    f"expected (tokens, {c}) with 1 to {t} tokens (the reference latent's positions)"
            expected[_h_f_key(r, l)] = (h_f, FLOAT_DTYPES)
        optional[f"ref{r}.thumbnail"] = (thumb, {"U8"})
    return expected, optional


def _positions(shape) -> int:
    """Latent positions (height x width) of a (1, c, h, w) shape; 0 for any other shape (refused elsewhere)."""
    return int(shape[2]) * int(shape[3]) if len(shape) == 4 else 0


def context_width(model_patcher):
    """The width of the text context the model's attn2 layers take (to_k's input), read off the model."""
    for _, module in attn2_modules(model_patcher.model.diffusion_model).values():
        return module.to_k.in_features
    return None


def check_reference_pass(identity: "Identity", model_patcher, per_step: bool = False):
    """The inputs of this identity's reference pass against the model, before the pass: a mismatch here is otherwise
    a raw 'mat1 and mat2 shapes cannot be multiplied' or ComfyUI's AssertionError deep inside the UNet."""
    who = f"Identity {identity.label}"
    fix = "encode the reference again with this model (IDFusion Encode Reference Face), or pick an identity made for it"
    base = model_patcher.model
    channels = getattr(base.diffusion_model, "in_channels", None)
    for r, lat in enumerate(identity.latents):
        if lat.ndim != 4 or (channels is not None and lat.shape[1] != channels):
            raise AdapterError(f"{who}: reference {r + 1}'s latent has {lat.shape[1] if lat.ndim == 4 else '?'} channels "
                               f"(shape {tuple(lat.shape)}) but this model's UNet takes {channels}; {fix}.")
        if _positions(lat.shape) > MAX_LATENT_TOKENS:
            raise AdapterError(f"{who}: reference {r + 1}'s latent is {lat.shape[3]}x{lat.shape[2]}, more than the "
                               f"{MAX_LATENT_TOKENS} positions (128x128, a 1024 px reference) a reference pass may take; "
                               f"encode a smaller crop of the face.")
    if per_step and len({tuple(lat.shape) for lat in identity.latents}) > 1:
        raise AdapterError(f"{who}: its references have different latent sizes "
                           f"({', '.join(str(tuple(lat.shape[2:])) for lat in identity.latents)}), which per_step mode cannot "
                           f"encode as one batch; use mode cached, or encode the references at one size.")
    width = context_width(model_patcher)
    ctx = identity.context
    if ctx.ndim != 3 or (width is not None and ctx.shape[-1] != width):
        raise AdapterError(f"{who}: its text context has shape {tuple(ctx.shape)} but this model's cross-attention takes "
                           f"{width}-wide text; it was encoded with another model family: {fix}.")
    adm = getattr(base, "adm_channels", 0) or 0
    if identity.y is not None and not adm:
        raise AdapterError(f"{who}: it holds an ADM vector y (the pooled text of SDXL-style models) but this model takes "
                           f"none; {fix}.")
    if adm and (identity.y is None or identity.y.ndim != 2 or identity.y.shape[-1] != adm):
        got = "none" if identity.y is None else f"shape {tuple(identity.y.shape)}"
        raise AdapterError(f"{who}: this model needs an ADM vector y of width {adm} for the reference pass, the file has "
                           f"{got}; {fix}.")


def thumbnail(image: torch.Tensor, size: int = THUMBNAIL) -> torch.Tensor:
    """(H, W, 3) float image in [0, 1] -> uint8 (h, w, 3), longest side at most `size`, aspect kept."""
    import torch.nn.functional as F
    H, W = image.shape[:2]
    scale = min(1.0, size / max(H, W))
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    x = image[..., :3].detach().float().cpu().permute(2, 0, 1)[None]
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def merge(identities: list[Identity], name: str | None = None) -> Identity:
    """Several identities' references as one identity (more references of the same person, Eq. 6)."""
    first = identities[0]
    for other in identities[1:]:
        if other.layers != first.layers:
            raise AdapterError(f"Identities '{first.name}' and '{other.name}' were encoded with different models; re-encode them with one model.")
    thumbs = [i.thumbnail(r) for i in identities for r in range(i.references)]  # both sets, aligned with references
    return Identity(first.layers, first.family, first.encoding, [h for i in identities for h in i.h_f],
                    [x for i in identities for x in i.latents], first.context, first.y, name or first.name,
                    thumbnails=thumbs if any(t is not None for t in thumbs) else [],
                    source=" + ".join(dict.fromkeys(i.source for i in identities if i.source)))


# ---- the reference pass ------------------------------------------------------------------------
class _Recorder:
    """attn2_patch that records the tensor attn2 receives as its query input (after norm2): h_f. It also lets Cancel
    stop a long pass between layers: ComfyUI's interrupt is otherwise only seen between sampler steps."""

    def __init__(self):
        self.h_f = {}

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        block = extra_options.get("block")
        if block is not None:
            self.h_f[(block[0], block[1], extra_options.get("block_index", 0))] = n
        return n, context_attn2, value_attn2

    def __deepcopy__(self, memo):
        return self


# Self-attention logits one uninterruptible call may compute: a 64x64 latent's top layer (a 512 px SD1.5 reference).
# Beyond it (up to the 128x128 bound) one attn1 call took 12-15 s on a 2-core CPU (synthetic model, sub-quadratic
# attention), so Cancel waited that long; in query chunks of this size it is checked about every second.
CHUNK_LOGITS = 4096 * 4096


class _ChunkedAttn1:
    """attn1 replace patch of a large reference pass: ComfyUI's own attention function over chunks of queries, checking
    the interrupt between chunks. Each query row's softmax is over all keys, so chunking rows changes no result."""

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention
        import comfy.model_management
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        step = max(1, CHUNK_LOGITS // max(1, k.shape[1]))
        out = []
        for i in range(0, q.shape[1], step):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out.append(attention.optimized_attention(q[:, i:i + step], k, v, heads, attn_precision=precision))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def __deepcopy__(self, memo):
        return self


def text_condition(model_patcher, clip=None, batch: int = 1, width: int = 512, height: int = 512):
    """The reference pass's text: CLIP's empty prompt when a CLIP is given, else a zero context.
    Returns (context (1, N_c, ctx), y or None, label)."""
    base = model_patcher.model
    if clip is not None:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        y = base.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                            target_width=width, target_height=height, prompt_type="positive") \
            if getattr(base, "adm_channels", 0) else None
        return cond[:1].float().cpu(), (y[:1].float().cpu() if y is not None else None), "empty"
    ctx_dim = base.model_config.unet_config.get("context_dim")
    context = torch.zeros(1, 77, ctx_dim)
    adm = getattr(base, "adm_channels", 0) or 0
    return context, (torch.zeros(1, adm) if adm else None), "zeros"


def run_reference_pass(base_model, device, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y=None) -> dict:
    """One UNet evaluation of latent x (b, c, h, w) at sigma (b,), recording h_f at every attn2 layer.
    Returns {layer key: (b, N_f, C)}. Only the recorder is active: other packs' attention patches are not
    part of the reference pass. The model must already be on `device` (comfy.model_management.load_models_gpu)."""
    recorder = _Recorder()
    opts = {"patches": {"attn2_patch": [recorder]}}
    if x.shape[-2] * x.shape[-1] > 64 * 64:  # only past 64x64, so every usual pass keeps ComfyUI's exact attention path
        chunked = _ChunkedAttn1()
        opts["patches_replace"] = {"attn1": {layer.key: chunked for layer in find_layers(base_model.diffusion_model)}}
    b = x.shape[0]
    kwargs = {}
    if y is not None:
        kwargs["y"] = y.to(device).expand(b, -1)
    with torch.no_grad():
        base_model.apply_model(x.to(device), sigma.to(device), c_crossattn=context.to(device).expand(b, -1, -1),
                         transformer_options=opts, **kwargs)
    return recorder.h_f


def reference_sigma(model_patcher, timestep: int) -> torch.Tensor:
    ms = model_patcher.get_model_object("model_sampling")
    return ms.sigma(torch.tensor([float(timestep)])).float().cpu()


def reference_h_f(model_patcher, layers: list[Layer], latent: torch.Tensor, sigma: torch.Tensor,
                  context: torch.Tensor, y=None) -> dict:
    """h_f of one reference: {layer name: (N_f, C) float32 on the CPU}, from one pass of its clean latent."""
    import comfy.model_management as mm
    mm.load_models_gpu([model_patcher])  # the VAE (or another model) may have pushed the UNet out of VRAM
    rec = run_reference_pass(model_patcher.model, model_patcher.load_device, latent, sigma, context, y)
    missing = [l.key for l in layers if l.key not in rec]
    if missing:
        raise AdapterError(f"The reference pass did not reach attn2 layers {missing[:3]}...: this model's UNet is not one IDFusion can patch.")
    return {l.name: rec[l.key][0].float().cpu() for l in layers}


def check_reference_size(image: torch.Tensor, vae, r: int = 0, latent: torch.Tensor | None = None):
    """Refuse a reference beyond MAX_LATENT_TOKENS positions (what a saved identity may hold, so every saved identity
    stays loadable): from the image size and the VAE's downscale_ratio before the VAE encodes (and allocates), or,
    for a VAE without an integer ratio, from the encoded latent."""
    ratio = getattr(vae, "downscale_ratio", None)  # ComfyUI's VAE crops to a multiple of it: latent = pixels // ratio
    if latent is not None:
        lat_h, lat_w = latent.shape[2], latent.shape[3]
    elif isinstance(ratio, int) and ratio > 0:
        lat_h, lat_w = image.shape[1] // ratio, image.shape[2] // ratio
    else:
        return
    if lat_h * lat_w > MAX_LATENT_TOKENS:
        raise AdapterError(f"Reference image {r + 1} is {image.shape[2]}x{image.shape[1]} px, a {lat_w}x{lat_h} latent: "
                           f"more than the {MAX_LATENT_TOKENS} positions (128x128) a reference pass may take. Crop the "
                           f"face or scale the image down (a face crop of 512-1024 px is plenty).")


def encode_references(model_patcher, vae, image: torch.Tensor, pass_h_f, check_latent=None, progress=None):
    """Both families' Encode: each reference image VAE-encoded on its own, bounded, then one reference pass
    (`pass_h_f(latent)` -> h_f per layer, the family's own). -> (h_f per reference, latents, thumbnails)."""
    base = model_patcher.model
    h_f, latents, thumbs = [], [], []
    for r in range(image.shape[0]):
        thumbs.append(thumbnail(image[r]))
        latent = base.process_latent_in(vae.encode(image[r:r + 1, :, :, :3])).float().cpu()
        if check_latent is not None:
            check_latent(latent)
        check_reference_size(image, vae, r, latent)
        h_f.append(pass_h_f(latent))
        latents.append(latent)
        if progress is not None:
            progress.update(1)
    return h_f, latents, thumbs


def encode_identity(model_patcher, vae, image: torch.Tensor, clip=None, timestep: int = 0,
                    mode: str = "cached", name: str = "identity", progress=None) -> Identity:
    """IMAGE batch (B, H, W, 3) of one person -> Identity with h_f per reference, one UNet pass each."""
    if image.ndim != 4 or image.shape[0] == 0:
        raise AdapterError("reference_images must be an IMAGE batch with at least one image.")
    check_reference_size(image, vae)
    base = model_patcher.model
    layers = find_layers(base.diffusion_model)
    context, y, text = text_condition(model_patcher, clip, width=image.shape[2], height=image.shape[1])
    sigma = reference_sigma(model_patcher, timestep)
    h_f, latents, thumbs = encode_references(
        model_patcher, vae, image, lambda latent: reference_h_f(model_patcher, layers, latent, sigma, context, y),
        progress=progress)
    return Identity(layers, model_family(model_patcher), {"mode": mode, "timestep": int(timestep), "text": text},
                    h_f, latents, context, y, name, thumbnails=thumbs)
