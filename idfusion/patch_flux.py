"""ComfyUI glue for Flux-family DiTs (comfy.ldm.flux.model.Flux: Flux dev, schnell, Kontext, Fill, and Flux 2 on the
same class): the reference is fused into the joint attention of every double and single block.

The sibling of patch.py (the UNet glue). The paper's maths is idfusion/fusion.py, shared by both; what is here is
how Flux's blocks are reached, all through ComfyUI's public hooks on a ModelPatcher clone:
- transformer_options["optimized_attention_override"]: every attention goes through comfy.ldm.modules.attention's
  wrap_attn, and Flux's forward names the block in transformer_options["block_type"] / ["block_index"]. The override
  appends the identity keys for the image queries. One found on the model (another pack's) is chained: ours calls it
  with [K; K_f]; one set later wraps ours the same way.
- an APPLY_MODEL wrapper: once per step, the sigma window, the token layout (image tokens, ReferenceLatent tokens)
  and, in per-step mode, the reference pass at the step's sigma.
- patches_replace["dit"] block replaces, only inside IDFusion's own reference pass (never on the sampled model):
  they record h_f.
No forward_orig swap, no monkey-patching; the input MODEL is never changed.

Choices (README "Flux"):
- h_f of a block = LayerNorm of the block's image tokens as they enter it (Flux's img_norm1 / pre_norm, which has no
  affine), from one pass of the reference latent through the same DiT: the counterpart of the UNet's attn2 input.
- K_f, V_f = the adapter's Linear_kf/Linear_vf of h_f, split into heads; K_f then goes through the block's own
  key RMSNorm (QK-norm) and RoPE, exactly as the block's own keys do. V_f is scaled by the weight.
- RoPE positions of reference tokens: time axis t = -1 for every reference of an identity, height and width the
  reference's own token grid from 0 (2x2 pooled tokens at the cell centres). Training puts its one reference there;
  Eq. 6's further references share it (attention over keys is a set, as the UNet's position-free K_f): on validation
  identities, three references gave 5.5 points (+2.1 SE) more retrieval so than with the second and third at t = -2,
  -3 (benchmarks/synthetic/positions_study.py). Flux's image grid sits at t = 0 and
  ComfyUI's ReferenceLatent puts its latents at t >= 0 ("offset"/"uxo": t = 1 or 0 with h/w beyond the image,
  "index": t = 1, 2, ...), text at 0; no token ComfyUI places has a negative t, so identity keys never share a
  position with an image, Kontext or text token.
- Only the image queries see the identity keys. Text queries (and ReferenceLatent's tokens) attend to the block's
  own keys alone: text tokens carry the prompt for every image position, so letting them read the identity would
  spread it over the whole frame past the Eq. 7 regions, and the uncond branch's text would no longer be the plain
  model's. In the UNet, likewise, only image queries ever see K_f.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import logging
import weakref

import torch
import torch.nn.functional as F

from . import fusion
from .adapter import AdapterError, IDFusionAdapter, Layer, model_family
from .identity import Identity, check_reference_size, encode_references
from .patch import Entry, Fusion, chunk_options  # noqa: F401  (Entry: one interface with patch.py for the nodes)

log = logging.getLogger("IDFusion")
FAMILY = "Flux"
OVERRIDE = "optimized_attention_override"
PATCH_KEY = "idfusion_flux"           # transformer_options key where the installed JointAttention is also kept
WRAPPER_KEY = "idfusion"
RELEASE_KEY = "idfusion_flux_release"
KINDS = ("double", "single")
REFERENCE_GUIDANCE = 3.5              # distilled guidance of the reference pass (ComfyUI's Flux default)
NEEDS = "0.3.75"                      # the pinned host; 0.3.52 has neither wrap_attn's override nor block_type


# ---- the model ------------------------------------------------------------------------------------------
def is_flux(model_patcher) -> bool:
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return False
    return isinstance(getattr(model_patcher.model, "diffusion_model", None), Flux)


def find_layers(diffusion_model) -> list[Layer]:
    """Every joint-attention block, in forward order: ("double", i, 0) then ("single", i, 0). Read off the model."""
    hidden, heads = diffusion_model.hidden_size, diffusion_model.num_heads
    return ([Layer(("double", i, 0), hidden, hidden, heads) for i in range(len(diffusion_model.double_blocks))]
            + [Layer(("single", i, 0), hidden, hidden, heads) for i in range(len(diffusion_model.single_blocks))])


def key_norm(diffusion_model, layer: Layer):
    """The block's own key RMSNorm (QK-norm), applied to K_f as to the block's image keys."""
    kind, i, _ = layer.key
    if kind == "double":
        return diffusion_model.double_blocks[i].img_attn.norm.key_norm
    return diffusion_model.single_blocks[i].norm.key_norm


def self_attention_kv(diffusion_model, layer: Layer):
    """(W_k, W_v) of the block's own image self-attention (for the adapter's 'attn1' warm start)."""
    kind, i, _ = layer.key
    hidden = diffusion_model.hidden_size
    w = (diffusion_model.double_blocks[i].img_attn.qkv.weight if kind == "double"
         else diffusion_model.single_blocks[i].linear1.weight)
    return w[hidden:2 * hidden], w[2 * hidden:3 * hidden]


def missing_hooks() -> str | None:
    """Why this ComfyUI cannot take IDFusion on Flux, or None. 0.3.52 lacks both hooks the fusion needs."""
    import comfy.ldm.modules.attention as attention
    from comfy.ldm.flux.model import Flux
    gaps = []
    if not hasattr(attention, "wrap_attn"):
        gaps.append("the attention override (transformer_options['optimized_attention_override'])")
    try:
        names_blocks = "block_type" in inspect.getsource(Flux.forward_orig)
    except (OSError, TypeError):
        names_blocks = True  # no source to read (frozen install): trust the override check
    if not names_blocks:
        gaps.append("the block names Flux's forward records (transformer_options['block_type'])")
    if not gaps:
        return None
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except ImportError:
        version = "an older version"
    return (f"IDFusion on Flux needs ComfyUI {NEEDS} or newer: this ComfyUI ({version}) lacks {' and '.join(gaps)}. "
            f"Update ComfyUI; SD1.5 and SDXL models work on this version.")


def check(obj, model_patcher, what: str = "Adapter"):
    """A clear AdapterError unless obj (adapter or identity) was made for this Flux model's blocks."""
    layers = find_layers(model_patcher.model.diffusion_model)
    if obj.layers == layers:
        return
    fam = model_family(model_patcher)
    label = f" {_label(obj)}" if what == "Identity" else ""
    if any(l.key[0] not in KINDS for l in obj.layers):
        raise AdapterError(f"{what}{label} was made for {obj.family} (a UNet, {len(obj.layers)} attn2 layers) but the "
                           f"model is {fam} (a Flux DiT, {len(layers)} blocks): pick an {what.lower()} made for this "
                           f"Flux model, or a {obj.family} checkpoint.")
    raise AdapterError(f"{what}{label} was made for {obj.family} with {_describe(obj.layers)} but the model is {fam} "
                       f"with {_describe(layers)}: pick an {what.lower()} made for this model.")


def _label(identity) -> str:
    return getattr(identity, "label", None) or f"'{identity.name}'"


def check_adapter(adapter, model_patcher):
    check(adapter, model_patcher, "Adapter")


def check_identity(identity, model_patcher, mode: str | None = None):
    """Its blocks, and when a reference pass will run (a compact file, or per_step mode) that pass's inputs: latent
    channels, text width, pooled vector. Shapes only, before any pass."""
    check(identity, model_patcher, "Identity")
    if mode != "per_step" and all(h is not None for h in identity.h_f):
        return
    who = f"Identity {_label(identity)}"
    fix = "encode the reference again with this model (IDFusion Encode Reference Face), or pick an identity made for it"
    params = model_patcher.model.diffusion_model.params
    for r, lat in enumerate(identity.latents):
        if lat.ndim != 4 or lat.shape[1] != params.in_channels:
            raise AdapterError(f"{who}: reference {r + 1}'s latent has shape {tuple(lat.shape)} but this Flux model takes "
                               f"{params.in_channels}-channel latents; {fix}.")
    if mode == "per_step" and len({tuple(lat.shape) for lat in identity.latents}) > 1:
        raise AdapterError(f"{who}: its references have different latent sizes, which per_step mode cannot encode as one "
                           f"batch; use mode cached, or encode the references at one size.")
    ctx = identity.context
    if ctx.ndim != 3 or ctx.shape[-1] != params.context_in_dim:
        raise AdapterError(f"{who}: its text context has shape {tuple(ctx.shape)} but this Flux model takes "
                           f"{params.context_in_dim}-wide text; {fix}.")
    vec = params.vec_in_dim
    if identity.y is not None and (not vec or identity.y.ndim != 2 or identity.y.shape[-1] != vec):
        raise AdapterError(f"{who}: its pooled text vector has shape {tuple(identity.y.shape)} but this Flux model takes "
                           f"{vec or 'none'}; {fix}.")


def _describe(layers) -> str:
    d = sum(l.key[0] == "double" for l in layers)
    s = sum(l.key[0] == "single" for l in layers)
    width = f", width {layers[0].channels}, {layers[0].heads} heads" if layers else ""
    return f"{d} double + {s} single blocks{width}"


def fresh_adapter(model_patcher, init: str = "zeros", seed: int = 0, encoding: dict | None = None) -> IDFusionAdapter:
    """A new adapter with Linear_kf/Linear_vf (hidden -> hidden) per block. init as IDFusionAdapter.fresh; 'attn1'
    copies each block's own image key/value projections."""
    problem = missing_hooks()
    if problem:
        raise AdapterError(problem)
    dm = model_patcher.model.diffusion_model
    layers = find_layers(dm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = IDFusionAdapter(layers, model_family(model_patcher), encoding)
    if init == "zeros":
        for p in adapter.parameters():
            torch.nn.init.zeros_(p)
    elif init == "attn1":
        with torch.no_grad():
            for l in layers:
                wk, wv = self_attention_kv(dm, l)
                adapter.to_k_f[l.name].weight.copy_(wk.float())
                adapter.to_v_f[l.name].weight.copy_(wv.float())
    elif init != "random":
        raise AdapterError(f"init must be 'zeros', 'attn1' or 'random', not {init!r}.")
    return adapter


def token_grid(latent_hw, patch_size: int):
    """Flux's token grid of a latent (h, w): patch_size x patch_size patches, the last padded (Flux.process_img)."""
    h, w = latent_hw
    return (h + patch_size // 2) // patch_size, (w + patch_size // 2) // patch_size


def reference_positions(latent_sizes, patch_size: int, axes: int, pooled: bool, device) -> torch.Tensor:
    """RoPE positions (N_f, axes) of references with these latent sizes (h, w), every reference at time index -1,
    height/width on its own token grid from 0; 2x2-pooled tokens sit at their cells' centres. Apply and training
    both place identity keys here."""
    ids = []
    for hw in latent_sizes:
        h, w = token_grid(hw, patch_size)
        step, off = 1.0, 0.0
        if pooled:
            h, w, step, off = (h + 1) // 2, (w + 1) // 2, 2.0, 0.5
        grid = torch.zeros(h, w, axes, device=device)
        grid[..., 0] = -1.0
        grid[..., 1] = (torch.arange(h, device=device, dtype=torch.float32) * step + off)[:, None]
        grid[..., 2] = (torch.arange(w, device=device, dtype=torch.float32) * step + off)[None, :]
        ids.append(grid.reshape(-1, axes))
    return torch.cat(ids)


# ---- the reference pass ---------------------------------------------------------------------------------------
class _BlockRecorder:
    """patches_replace["dit"] entry for one block in the reference pass: records h_f = LayerNorm(image tokens entering
    the block), then runs the block unchanged. It also lets Cancel stop a long pass between blocks (as the UNet pass
    does between layers): ComfyUI's interrupt is otherwise only seen between sampler steps."""

    def __init__(self, key, n_txt: int, store: dict):
        self.key, self.n_txt, self.store = key, n_txt, store

    def __call__(self, args, extra):
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        img = args["img"]
        if self.key[0] == "single":  # single blocks see cat(txt, img)
            img = img[:, self.n_txt:]
        self.store[self.key] = F.layer_norm(img.float(), (img.shape[-1],), eps=1e-6)  # before the block adds in place
        return extra["original_block"](args)


def run_reference_pass(base_model, device, x, sigma, context, y=None) -> dict:
    """One DiT evaluation of latent x (b, c, h, w) at sigma (b,): {layer key: h_f (b, N_f, C)}. Only the recorders are
    active (no other pack's patches, no ReferenceLatent). The model must already be on `device`."""
    dm = base_model.diffusion_model
    store, b = {}, x.shape[0]
    blocks = {}
    for l in find_layers(dm):
        blocks[(f"{l.key[0]}_block", l.key[1])] = _BlockRecorder(l.key, context.shape[1], store)
    kwargs = {}
    if y is not None:
        kwargs["y"] = y.to(device).expand(b, -1)
    if dm.params.guidance_embed:
        kwargs["guidance"] = torch.full((b,), REFERENCE_GUIDANCE, device=device)
    with torch.no_grad():
        base_model.apply_model(x.to(device), sigma.to(device), c_crossattn=context.to(device).expand(b, -1, -1),
                               transformer_options={"patches_replace": {"dit": blocks}}, **kwargs)
    return store


def reference_sigma(model_patcher, timestep: int) -> torch.Tensor:
    """The reference pass's sigma for an Identity's timestep (0..999, 0 = clean) on this model's time scale."""
    ms = model_patcher.get_model_object("model_sampling")
    return torch.tensor([float(ms.percent_to_sigma(1.0 - timestep / 1000.0))])


def reference_h_f(model_patcher, layers, latent, sigma, context, y=None) -> dict:
    """h_f of one reference: {layer name: (N_f, C) float32 on the CPU}."""
    import comfy.model_management as mm
    mm.load_models_gpu([model_patcher])
    rec = run_reference_pass(model_patcher.model, model_patcher.load_device, latent, sigma, context, y)
    missing = [l.key for l in layers if l.key not in rec]
    if missing:
        raise AdapterError(f"The reference pass did not reach Flux blocks {missing[:3]}: a node replaces them without "
                           f"calling the original block.")
    return {l.name: rec[l.key][0].float().cpu() for l in layers}


def text_condition(model_patcher, clip=None):
    """The reference pass's text: CLIP's empty prompt (its pooled output as y) when a CLIP is given, else one zero
    token and a zero pooled vector. Returns (context, y or None, label)."""
    dm = model_patcher.model.diffusion_model
    vec = dm.params.vec_in_dim
    if clip is not None:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        y = pooled[:1].float().cpu() if (vec and pooled is not None) else None
        return cond[:1].float().cpu(), y, "empty"
    return torch.zeros(1, 1, dm.params.context_in_dim), (torch.zeros(1, vec) if vec else None), "zeros"


def latent_channels(model_patcher) -> int:
    return model_patcher.model.diffusion_model.params.in_channels


def encode_identity(model_patcher, vae, image, clip=None, timestep: int = 0, mode: str = "cached",
                    name: str = "identity", progress=None) -> Identity:
    """IMAGE batch (B, H, W, 3) of one person -> Identity with h_f per reference and block, one DiT pass each."""
    problem = missing_hooks()
    if problem:
        raise AdapterError(problem)
    if image.ndim != 4 or image.shape[0] == 0:
        raise AdapterError("reference_images must be an IMAGE batch with at least one image.")
    check_reference_size(image, vae)
    base = model_patcher.model
    layers = find_layers(base.diffusion_model)
    context, y, text = text_condition(model_patcher, clip)
    sigma = reference_sigma(model_patcher, timestep)
    def same_channels(latent):
        if latent.shape[1] != latent_channels(model_patcher):
            raise AdapterError(f"The VAE gives {latent.shape[1]}-channel latents but this Flux model takes "
                               f"{latent_channels(model_patcher)}: connect the model's own VAE (ae.safetensors).")
    h_f, latents, thumbs = encode_references(
        model_patcher, vae, image, lambda latent: reference_h_f(model_patcher, layers, latent, sigma, context, y),
        same_channels, progress)
    return Identity(layers, model_family(model_patcher), {"mode": mode, "timestep": int(timestep), "text": text},
                    h_f, latents, context, y, name, thumbnails=thumbs)


def identity_for_model(identity: Identity, model_patcher) -> Identity:
    """identity with h_f for every reference (compact files store only latents): one reference pass each through this
    DiT, kept per model and weight patches (the latest two), as Identity.for_model does for the UNet."""
    missing = [r for r, h in enumerate(identity.h_f) if h is None]
    if not missing:
        return identity
    uuid = getattr(model_patcher, "patches_uuid", None)
    for ref, patches, done in identity._computed:
        if ref() is model_patcher.model and patches == uuid:
            return done
    check_identity(identity, model_patcher)
    sigma = reference_sigma(model_patcher, identity.encoding.get("timestep", 0))
    h_f = list(identity.h_f)
    for r in missing:
        h_f[r] = reference_h_f(model_patcher, identity.layers, identity.latents[r], sigma, identity.context, identity.y)
    done = copy.copy(identity)  # the same identity (name, source file, thumbnails) with h_f filled in
    done.h_f, done._computed = h_f, []
    identity._computed = [e for e in identity._computed if e[0]() is not None][-1:] + \
        [(weakref.ref(model_patcher.model), uuid, done)]
    return done


# ---- one Apply ------------------------------------------------------------------------------------------------
class FluxFusion(Fusion):
    """Fusion (patch.py) for a Flux DiT: the same inputs and Eq. 2 projection; K_f additionally goes through the
    block's key RMSNorm and RoPE at the reference positions, laid out per head: (heads, N_f, head_dim)."""

    reference_pass = staticmethod(run_reference_pass)   # the DiT's own reference pass (per-step mode)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._heads = {}  # (layer name, device, dtype, weight) -> [(K_f, V_f) per entry], (heads, N_f, dh) each

    def release(self):
        super().release()
        self._heads.clear()

    def cached_tensors(self) -> list:
        return super().cached_tensors() + [t for kv in self._heads.values() for pair in kv for t in pair]

    def reference_ids(self, layer: Layer, latents, patch_size: int, axes: int, device) -> torch.Tensor:
        """RoPE positions (N_f, axes) of one entry's references, in the order _project concatenates them."""
        return reference_positions([lat.shape[-2:] for lat in latents], patch_size, axes, layer.name in self._pooled,
                                   device)

    def kv_heads(self, layer: Layer, device, dtype, state: dict | None, dm):
        """[(K_f, V_f)] per entry at this block, each (heads, N_f, head_dim): K_f key-normed and rotated."""
        per_step = self.mode == "per_step" and state is not None and "h_f" in state
        key = (layer.name, device, dtype, self.weight_at(layer))
        if not per_step and key in self._heads:
            return self._heads[key]
        from comfy.ldm.flux.math import apply_rope1
        heads, dh = layer.heads, layer.inner // layer.heads
        norm = key_norm(dm, layer)
        out = []
        for e, (kf, vf) in zip(self.entries, self.kv(layer, device, torch.float32, state)):
            kf = kf.reshape(-1, heads, dh).transpose(0, 1).to(dtype)     # (heads, N_f, dh)
            vf = vf.reshape(-1, heads, dh).transpose(0, 1).to(dtype)
            kf = norm(kf).to(dtype)
            ids = self.reference_ids(layer, e.identity.latents, dm.patch_size, len(dm.params.axes_dim), device)
            pe = dm.pe_embedder(ids[None])                                # (1, 1, N_f, dh/2, 2, 2)
            out.append((apply_rope1(kf[None], pe)[0], vf))
        if not per_step:
            self._heads[key] = out
        return out

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """Once per step: the sigma window, the token layout of this call and, in per-step mode, the references
        re-encoded at this sigma through the same DiT."""
        sigma = float(t.reshape(-1)[0])
        state = {"active": self.sigma_end <= sigma <= self.sigma_start}
        base = executor.class_obj
        if state["active"] and self.mode == "per_step":
            state["h_f"] = self._encode_step(base, t, x.device)
        dm = base.diffusion_model
        p = dm.patch_size
        h, w = token_grid(x.shape[-2:], p)
        extra = sum(math_prod(token_grid(r.shape[-2:], p)) for r in (kwargs.get("ref_latents") or []))
        to = dict(transformer_options)
        to["idfusion"] = {**to.get("idfusion", {}), self.uid: state, "sigma": sigma,
                          "layout": {"image": h * w, "extra": extra, "grid": (h, w), "model": dm}}
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)


def math_prod(hw) -> int:
    return int(hw[0]) * int(hw[1])


# ---- the attention override ---------------------------------------------------------------------------------
class JointAttention:
    """transformer_options["optimized_attention_override"] for Flux: at the blocks it patches, the image queries
    attend to [K; K_f1; ...] (Eqs. 3, 6) with the Eq. 7 region mask; text and ReferenceLatent queries attend as
    before. Several Applies stack into one JointAttention (their identities share one Eq. 7 mask). An override that
    was on the model before is chained (`previous`: it receives the extended keys); anything else goes through
    unchanged."""

    def __init__(self, layers: dict, fusions: list, previous=None):
        self.layers = dict(layers)         # (block_type, block_index) -> Layer
        self.fusions, self.previous = list(fusions), previous
        self._masks = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: a clone gets its own copy of the chained override; the
        # Fusions (adapter, identities, K_f/V_f caches) are shared and never mutated
        new = JointAttention(self.layers, self.fusions)
        memo[id(self)] = new
        new.previous = copy.deepcopy(self.previous, memo)
        return new

    def release(self):
        self._masks.clear()
        for f in self.fusions:
            f.release()

    def cached_tensors(self) -> list:
        return list(self._masks.values()) + [t for f in self.fusions for t in f.cached_tensors()]

    def _next(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        states = to.get("idfusion") or {}
        layout = states.get("layout")
        layer = self.layers.get((to.get("block_type"), to.get("block_index"))) if layout else None
        if layer is None or len(args) != 4 or not kwargs.get("skip_reshape"):
            return self._next(func, *args, **kwargs)  # not a Flux block attention this pack patches
        q, k, v, heads = args
        cond_or_uncond = to.get("cond_or_uncond") or [0]
        per_chunk = [tuple(f for f in self.fusions
                           if states.get(f.uid, {"active": True})["active"] and (c == 0 or f.uncond)
                           and f.weight_at(layer) != 0)
                     for c in cond_or_uncond]
        if len(set(per_chunk)) == 1 or q.shape[0] % len(cond_or_uncond):
            return self._attend(func, q, k, v, heads, per_chunk[0], layer, kwargs, states, layout)
        # CFG chunks fusing different identities (uncond: text only) are attended separately, each with
        # transformer_options describing exactly its rows
        bs = q.shape[0] // len(cond_or_uncond)
        out, first = [], 0
        for fusions, group in itertools.groupby(per_chunk):
            n = len(list(group))
            rows = slice(first * bs, (first + n) * bs)
            kw = dict(kwargs, transformer_options=chunk_options(to, first, n, bs))
            mask = kwargs.get("mask")
            if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
                kw["mask"] = mask[rows]
            out.append(self._attend(func, q[rows], k[rows], v[rows], heads, fusions, layer, kw, states, layout))
            first += n
        return torch.cat(out)

    def _attend(self, func, q, k, v, heads, fusions, layer, kwargs, states, layout):
        nq, nk = q.shape[2], k.shape[2]                # q, k, v: (b, heads, N, dh), RoPE applied
        if not fusions or not layout["image"]:
            return self._next(func, q, k, v, heads, **kwargs)
        i1 = nq - layout["extra"]                      # queries: [txt | image | ReferenceLatent]; text length read off q
        i0 = i1 - layout["image"]
        if i0 < 0:
            raise AdapterError(f"IDFusion expected {layout['image']} image tokens in Flux block {layer.key} but the "
                               f"attention has {nq} queries in all; a node changed the token layout.")
        K_f, V_f, entries = [], [], []
        for f in fusions:
            for e, (kf, vf) in zip(f.entries, f.kv_heads(layer, q.device, q.dtype, states.get(f.uid), layout["model"])):
                K_f.append(kf), V_f.append(vf), entries.append(e)
        b = q.shape[0]
        K = torch.cat([k] + [t[None].expand(b, -1, -1, -1) for t in K_f], dim=2)   # (b, heads, N_k + sum N_f, dh)
        V = torch.cat([v] + [t[None].expand(b, -1, -1, -1) for t in V_f], dim=2)
        mask = kwargs.get("mask")
        allow = None
        if any(e.region is not None for e in entries):
            allow = self._mask(fusions, entries, [t.shape[1] for t in K_f], nk, layout["grid"], q.device)
        # a chained override sees exactly the rows it is handed (an IDFusion one further down included)
        kw_img = _with_layout(kwargs, dict(layout, extra=0), mask=_image_mask(mask, i0, i1, nq, nk, K.shape[2] - nk,
                                                                               allow, q.dtype))
        out_img = self._next(func, q[:, :, i0:i1], K, V, heads, **kw_img)
        if i0 == 0 and i1 == nq:
            return out_img
        # text (and ReferenceLatent) queries: the block's own keys only
        q_rest = torch.cat([q[:, :, :i0], q[:, :, i1:]], dim=2)
        kw_rest = _with_layout(kwargs, dict(layout, image=0, extra=0), mask=_rows(mask, [(0, i0), (i1, nq)], nq))
        out_rest = self._next(func, q_rest, k, v, heads, **kw_rest)
        dim = 2 if kwargs.get("skip_output_reshape") else 1
        return torch.cat([out_rest.narrow(dim, 0, i0), out_img, out_rest.narrow(dim, i0, nq - i1)], dim=dim)

    def _mask(self, fusions, entries, tokens, n_keys, grid, device):
        h, w = grid
        key = (tuple(f.uid for f in fusions), tuple(tokens), n_keys, h, w, device)
        if key not in self._masks:  # once per block and shape, reused every step
            inside = torch.stack([fusion.region_tokens(e.region, h, w) if e.region is not None
                                  else torch.zeros(h * w, dtype=torch.bool) for e in entries], dim=1)
            confine = torch.tensor([e.confine and e.region is not None for e in entries])
            blocked = fusion.blocked_identities(inside, confine)
            # the block's own keys (text, image, ReferenceLatent) are never masked: every query keeps them
            self._masks[key] = fusion.key_allow_mask(blocked, tokens, n_keys).to(device)
        return self._masks[key]


def _with_layout(kwargs, layout, **changes):
    to = dict(kwargs.get("transformer_options") or {})
    to["idfusion"] = dict(to.get("idfusion") or {}, layout=layout)
    return dict(kwargs, transformer_options=to, **changes)


def _rows(mask, ranges, n):
    """The rows of an attention mask (..., N or 1, N_k) for the given query ranges; None stays None."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] != n:
        return mask
    return torch.cat([mask[..., a:b, :] for a, b in ranges if b > a], dim=-2)


def _image_mask(mask, i0, i1, nq, nk, n_id, allow, dtype):
    """The mask for the image queries over [K; K_f]: the model's own mask (if any) on the block's keys, the Eq. 7
    mask (if any) on the identity keys. Additive (0 / -inf) unless the model's mask is boolean."""
    if mask is None and allow is None:
        return None
    if mask is None:
        return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill_(~allow, float("-inf"))
    m = _rows(mask, [(i0, i1)], nq)
    if m.shape[-1] != nk:
        raise AdapterError(f"The model's attention mask has {m.shape[-1]} keys where the block has {nk}; IDFusion "
                           f"cannot extend it with the identity keys.")
    if allow is not None and m.shape[-2] != i1 - i0:  # a mask broadcast over queries: Eq. 7 differs per query
        m = m.expand(*m.shape[:-2], i1 - i0, nk)
    ident = allow[:, nk:] if allow is not None else torch.ones(1, n_id, dtype=torch.bool, device=m.device)
    ident = ident.to(m.device).expand(*m.shape[:-1], n_id)
    if m.dtype == torch.bool:
        return torch.cat([m, ident], dim=-1)
    add = torch.zeros(ident.shape, dtype=m.dtype, device=m.device).masked_fill(~ident, float("-inf"))
    return torch.cat([m, add], dim=-1)


# ---- install ------------------------------------------------------------------------------------------------
def ours(model_patcher) -> list[JointAttention]:
    p = model_patcher.model_options.get("transformer_options", {}).get(PATCH_KEY)
    return [p] if isinstance(p, JointAttention) else []


def release_device_memory(model_patcher):
    """ON_CLEANUP: drop K_f/V_f, masks and per-step data kept on the device (ComfyUI's memory manager cannot see them)."""
    for p in ours(model_patcher):
        p.release()


def cached_tensors(model_patcher) -> list:
    out = {}
    for p in ours(model_patcher):
        for t in p.cached_tensors():
            out[id(t)] = t
    return list(out.values())


def install(model_patcher, fusion_: FluxFusion):
    """A clone of model_patcher whose joint attention also attends to fusion_'s identities at every block.

    Another pack's override found on the clone is chained under ours; an earlier IDFusion Apply is stacked with this
    one (one JointAttention, one Eq. 7 mask). The input model_patcher is not touched."""
    problem = missing_hooks()
    if problem:
        raise AdapterError(problem)
    m = model_patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(OVERRIDE)
    mine = to.get(PATCH_KEY)
    layers = {(l.key[0], l.key[1]): l for l in fusion_.adapter.layers}
    if isinstance(mine, JointAttention) and prev is mine:   # the last override is IDFusion's: stack on it
        patch = JointAttention({**mine.layers, **layers}, mine.fusions + [fusion_], mine.previous)
    else:                                                    # chain whatever is there (another pack's, or a wrapped ours)
        patch = JointAttention(layers, [fusion_], prev)
    to[OVERRIDE] = patch
    to[PATCH_KEY] = patch
    from comfy.patcher_extension import CallbacksMP, WrappersMP
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, f"{WRAPPER_KEY}_{fusion_.uid}", fusion_.apply_model_wrapper)
    if not m.get_callbacks(CallbacksMP.ON_CLEANUP, RELEASE_KEY):
        m.add_callback_with_key(CallbacksMP.ON_CLEANUP, RELEASE_KEY, release_device_memory)
    return m



# ---- training (idfusion/train.py's Trainer, through families.py) ------------------------------------------------
TRAIN_KEY = "idfusion_train"          # transformer_options key of one training forward's per-row data


def train_sigma(model_sampling, t: torch.Tensor) -> torch.Tensor:
    """A training draw t in 0..999 -> sigma on Flux's flow schedule: ModelSamplingFlux.sigma takes a time in (0, 1]
    (its shift applied), not an integer timestep as the UNets' discrete schedules do."""
    return model_sampling.sigma((t.float() + 1.0) / 1000.0)


def target_kwargs(base_model, ref_y, caption_y, batch: int, device) -> dict:
    """The target forward's extra inputs: the caption's pooled text as Flux's vector input (what a prompt gives it at
    inference), and on guidance-distilled models ComfyUI's default guidance (model_base.Flux.extra_conds: 3.5)."""
    dm = base_model.diffusion_model
    out = {}
    if dm.params.vec_in_dim:
        out["y"] = (caption_y if caption_y is not None else torch.zeros(batch, dm.params.vec_in_dim)).to(device)
    if dm.params.guidance_embed:
        out["guidance"] = torch.full((batch,), REFERENCE_GUIDANCE, device=device)
    return out


class TrainAttention:
    """transformer_options["optimized_attention_override"] of a training forward: at every block the image queries
    attend to [K; K_f] with K_f/V_f from each row's own h_f through the adapter's Linear_kf/Linear_vf (Eq. 2), with
    gradients, K_f through the block's key RMSNorm and RoPE exactly as Apply does (JointAttention). Text queries see
    the block's own keys only. Rows whose reference was dropped do not see the identity keys at all (the uncond
    behaviour at inference)."""

    def __init__(self, adapter: IDFusionAdapter, dm):
        self.adapter, self.dm = adapter, dm
        self.layers = {(l.key[0], l.key[1]): l for l in adapter.layers}

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        st = to.get(TRAIN_KEY)
        layer = self.layers.get((to.get("block_type"), to.get("block_index"))) if st else None
        if layer is None or len(args) != 4 or not kwargs.get("skip_reshape"):
            return func(*args, **kwargs)
        from comfy.ldm.flux.math import apply_rope1
        q, k, v, heads = args                                   # (b, heads, N, dh), RoPE applied
        b, nq, dh = q.shape[0], q.shape[2], q.shape[3]
        wk, wv = (w.to(q.dtype) for w in self.adapter.weights(layer))
        K_f, V_f = fusion.project(st["h_f"][layer.key].to(q.dtype), wk, wv)        # (b, N_f, D), Eq. 2
        K_f = key_norm(self.dm, layer)(K_f.reshape(b, -1, heads, dh).transpose(1, 2)).to(q.dtype)
        K_f = apply_rope1(K_f, st["pe"][layer.key])
        V_f = V_f.reshape(b, -1, heads, dh).transpose(1, 2)
        K, V = torch.cat([k, K_f], dim=2), torch.cat([v, V_f], dim=2)              # Eq. 3
        mask = None
        keep = st["keep"]
        if not bool(keep.all()):                                # dropped rows: the identity keys are masked out
            mask = torch.zeros(b, 1, 1, K.shape[2], dtype=q.dtype, device=q.device)
            mask[~keep, :, :, k.shape[2]:] = float("-inf")
        i0 = nq - st["image"]                                   # queries: [txt | image] (no ReferenceLatent in training)
        out_img = func(q[:, :, i0:], K, V, heads, **dict(kwargs, mask=mask))
        if i0 == 0:
            return out_img
        out_txt = func(q[:, :, :i0], k, v, heads, **kwargs)
        return torch.cat([out_txt, out_img], dim=2 if kwargs.get("skip_output_reshape") else 1)


class TrainOptions:
    """The glue's training forward: per call, the transformer_options that fuse each row's h_f (TrainAttention)."""

    def __init__(self, adapter: IDFusionAdapter, base_model, pooled: set):
        self.dm = base_model.diffusion_model
        self.attention, self.pooled = TrainAttention(adapter, self.dm), set(pooled)
        self.layers = adapter.layers

    def __call__(self, h_f: dict, keep: torch.Tensor, x_t: torch.Tensor, ref_hw) -> dict:
        dm = self.dm
        pe = {}
        for pooled in {l.key in self.pooled for l in self.layers}:  # Flux's blocks share one width: one or two grids
            ids = reference_positions([ref_hw], dm.patch_size, len(dm.params.axes_dim), pooled, x_t.device)
            pe[pooled] = dm.pe_embedder(ids[None])
        h, w = token_grid(x_t.shape[-2:], dm.patch_size)
        return {OVERRIDE: self.attention,
                TRAIN_KEY: {"h_f": h_f, "keep": keep, "image": h * w,
                            "pe": {l.key: pe[l.key in self.pooled] for l in self.layers}}}


def train_options(adapter: IDFusionAdapter, base_model, pooled: set) -> TrainOptions:
    return TrainOptions(adapter, base_model, pooled)


def _copies_inputs_it_updates(forward):
    """Flux's blocks add into their input in place (img += ..., x += ...) after their LayerNorm saved it for
    backward, which autograd refuses ('modified by an inplace operation'). While one block runs with autograd on, a
    saved tensor that shares storage with the block's input is saved as a copy, so backward sees the value the norm
    read. Recomputing the block in backward (gradient checkpointing) is not offered: the recompute's saved tensors are
    updated in place the same way and gave a wrong gradient (-3.16 for -3.47 by finite differences, float64)."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # the stream(s) the block updates: double blocks take img= and txt=, single blocks their input first
        updated = [kwargs.get("img"), kwargs.get("txt"), args[0] if args else kwargs.get("x")]
        inputs = {t.untyped_storage().data_ptr() for t in updated if torch.is_tensor(t)}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in inputs else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)
    return run


def trainable(model_patcher, gradient_checkpointing: bool = False):
    """A clone whose blocks can be back-propagated through (_copies_inputs_it_updates), set through ModelPatcher
    object patches so the model is restored when it is unpatched. gradient_checkpointing is not available on Flux
    (see _copies_inputs_it_updates): activations are kept."""
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock
    if gradient_checkpointing:
        log.info("IDFusion training on Flux: gradient checkpointing is not available (Flux's blocks update their input "
                 "in place); activations are kept.")
    patched = model_patcher.clone()
    for name, m in patched.model.diffusion_model.named_modules():
        if isinstance(m, (DoubleStreamBlock, SingleStreamBlock)):
            patched.add_object_patch(f"diffusion_model.{name}.forward",
                                     _copies_inputs_it_updates(type(m).forward.__get__(m)))
    return patched
