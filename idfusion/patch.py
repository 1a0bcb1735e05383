"""ComfyUI glue: install the fused attention on a ModelPatcher clone through attn2 replace patches and an
APPLY_MODEL wrapper. Nothing in ComfyUI is monkey-patched; the input model is never touched."""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
from dataclasses import dataclass

import torch

from . import fusion
from .adapter import AdapterError, IDFusionAdapter, Layer
from .identity import Identity, run_reference_pass

log = logging.getLogger("IDFusion")
_uids = itertools.count(1)
WRAPPER_KEY = "idfusion"


@dataclass
class Entry:
    """One identity as applied: its references, its region (Eq. 7) and whether the region also hides it
    from queries outside (an Apply attn_mask)."""
    identity: Identity
    region: torch.Tensor | None = None   # (H, W) in [0, 1]
    confine: bool = False


class Fusion:
    """One Apply: an adapter, the identities it fuses, when (sigma range) and for which CFG branch.

    Holds the projected K_f/V_f per layer, device and dtype (projected once per reference, Eq. 2).

    layer_weights: layer name -> factor on `weight` (per-block weights; missing layers 1). A layer whose
    weight is 0 is not attended by this Fusion at all, so alone it leaves that layer's attn2 unpatched.
    reference_tokens: "all", or "pooled": 2x2 average pooling of each reference's h_f at the highest-resolution
    attention layers (SD1.5: the latent's own resolution; SDXL: half of it), fewer keys where they cost most."""

    REFERENCE_TOKENS = ("all", "pooled")
    reference_pass = staticmethod(run_reference_pass)   # per-step mode's pass; the Flux glue swaps in its own

    def __init__(self, adapter: IDFusionAdapter, entries: list[Entry], weight: float = 1.0,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, uncond: bool = False,
                 mode: str = "cached", seed: int = 0, reference_tokens: str = "all",
                 layer_weights: dict | None = None):
        if mode not in ("cached", "per_step"):
            raise AdapterError(f"mode must be 'cached' or 'per_step', not {mode!r}.")
        if reference_tokens not in self.REFERENCE_TOKENS:
            raise AdapterError(f"reference_tokens must be 'all' or 'pooled', not {reference_tokens!r}.")
        self.uid = next(_uids)
        self.adapter, self.entries, self.weight = adapter, entries, float(weight)
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.uncond, self.mode, self.seed = uncond, mode, seed
        self.reference_tokens = reference_tokens
        # the highest-resolution attention layers are the narrowest ones: SD-style UNets widen as they downsample
        narrowest = min(l.channels for l in adapter.layers)
        self._pooled = {l.name for l in adapter.layers if l.channels == narrowest} if reference_tokens == "pooled" else set()
        self.layer_weights = {k: float(v) for k, v in (layer_weights or {}).items()}
        self._kv = {}       # (layer name, device, dtype, weight at the layer) -> [(K_f, V_f) per entry]
        self._weights = {}  # per-step mode only: (layer name, device) -> Linear_kf/Linear_vf weights on device
        self._refs = {}     # per-step mode: device -> per entry, (reference latents, their fixed noise) on the device

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options; share, don't copy tensors
        return self

    def release(self):
        """Forget K_f/V_f, per-step weights and reference latents kept on the device (ComfyUI's memory manager
        does not see them). Called after sampling; the next run projects again from the CPU copies."""
        self._kv.clear()
        self._weights.clear()
        self._refs.clear()

    def cached_tensors(self) -> list:
        return ([t for kv in self._kv.values() for pair in kv for t in pair]
                + [t for w in self._weights.values() for t in w]
                + [t for refs in self._refs.values() for pair in refs for t in pair])

    def weight_at(self, layer: Layer) -> float:
        """This Fusion's weight at one layer: `weight` times the layer's per-block factor."""
        return self.weight * self.layer_weights.get(layer.name, 1.0)

    def _tokens(self, layer: Layer, h: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One reference's h_f (N_f, C) at one layer, pooled 2x2 when the token budget asks for it at this layer.
        The layer's token grid is the reference latent's (1, c, H, W), halved (ceil) once per UNet level."""
        if layer.name not in self._pooled:
            return h
        H, W = latent.shape[-2:]
        while H * W > h.shape[-2]:
            H, W = (H + 1) // 2, (W + 1) // 2
        return fusion.pool_tokens(h, H, W)

    def _project(self, layer: Layer, refs: list[torch.Tensor], latents: list[torch.Tensor], device, dtype):
        key = (layer.name, device)
        weights = self._weights.get(key) or tuple(w.detach().to(device, torch.float32) for w in self.adapter.weights(layer))
        if self.mode == "per_step":  # projected every step: keep this layer's weights on the device
            self._weights[key] = weights
        ks, vs = zip(*(fusion.project(self._tokens(layer, h.to(device, torch.float32), lat), *weights, self.weight_at(layer))
                       for h, lat in zip(refs, latents)))
        return torch.cat(ks).to(dtype), torch.cat(vs).to(dtype)  # several references concatenate (Eq. 6)

    def kv(self, layer: Layer, device, dtype, state: dict | None):
        """[(K_f, V_f)] per entry for this layer, each (sum of reference tokens, D)."""
        if self.mode == "per_step" and state is not None and "h_f" in state:
            return [self._project(layer, [h[layer.key][r] for r in range(h[layer.key].shape[0])], e.identity.latents,
                                  device, dtype)
                    for e, h in zip(self.entries, state["h_f"])]
        key = (layer.name, device, dtype, self.weight_at(layer))  # the layer's own weight scales its V_f
        if key not in self._kv:
            self._kv[key] = [self._project(layer, [h[layer.name] for h in e.identity.h_f], e.identity.latents, device, dtype)
                             for e in self.entries]
        return self._kv[key]

    # ---- once per sampling step ----------------------------------------------------------------
    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """Decides once per step (not per layer) whether this Fusion is active at this sigma; in per-step
        mode also re-encodes every reference, noised to this sigma, through the same UNet."""
        sigma = float(t.reshape(-1)[0])  # one host read per step, none per layer
        state = {"active": self.sigma_end <= sigma <= self.sigma_start}
        if state["active"] and self.mode == "per_step":
            state["h_f"] = self._encode_step(executor.class_obj, t, x.device)
        to = dict(transformer_options)
        to["idfusion"] = {**to.get("idfusion", {}), self.uid: state, "sigma": sigma}  # sigma: for stacked packs' windows
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

    def _encode_step(self, base_model, t, device):
        ms = base_model.model_sampling
        if device not in self._refs:  # moved to the device once, not every step
            g = torch.Generator().manual_seed(self.seed)
            self._refs[device] = [(torch.cat([l.to(device) for l in e.identity.latents]),
                                   torch.cat([torch.randn(l.shape, generator=g) for l in e.identity.latents]).to(device))
                                  for e in self.entries]
        out = []
        for e, (lat, noise) in zip(self.entries, self._refs[device]):
            sigma = t.reshape(-1)[:1].expand(lat.shape[0]).to(device)
            x_ref = ms.noise_scaling(sigma, noise, lat)
            out.append(self.reference_pass(base_model, device, x_ref, sigma, e.identity.context, e.identity.y))
        return out


@functools.lru_cache(maxsize=None)
def _accepts_transformer_options(fn) -> bool:
    """0.3.75's attention functions take transformer_options (for overrides); 0.3.52's do not."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "transformer_options" or p.kind is p.VAR_KEYWORD for p in params)


class LayerPatch:
    """The attn2 replace at one layer. Several Applies on one model stack into one LayerPatch (their
    identities concatenate and share one Eq. 7 mask). Another pack's replace found on the layer is chained
    (`previous`: it receives K' and V'); another pack applied later stacks on this one with `.add(callback,
    **kwargs)`, the convention of IPAdapter_plus, InstantID and PuLID: the callback's output is added."""

    def __init__(self, layer: Layer, fusions: list[Fusion], previous=None, added=None):
        self.layer, self.fusions, self.previous = layer, list(fusions), previous
        self.added = list(added or [])   # [(callback, kwargs)] stacked by other packs through .add
        self._masks = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options. A clone gets its own patch (its own .add list and its own
        # copy of the chained patch), so a pack that mutates what it finds on the clone's key never reaches the input
        # MODEL or a sibling branch. The Fusions (adapter, identities, K_f/V_f cache) are shared, never mutated.
        new = LayerPatch(self.layer, self.fusions, None, [(cb, dict(kw)) for cb, kw in self.added])
        memo[id(self)] = new
        new.previous = copy.deepcopy(self.previous, memo)
        return new

    # ---- what other packs call on the patch they find on their key -------------------------------
    def add(self, callback, **kwargs):
        """Stack another pack's attention on this layer, as IPAdapter_plus's/InstantID's/PuLID's Attn2Replace.add
        does: after the fused attention, out += callback(out, q, k, v, extra_options, **kwargs) for steps whose
        sigma lies in [kwargs['sigma_end'], kwargs['sigma_start']] (always, when the pack gives no window)."""
        self.added.append((callback, kwargs))

    def set_new_condition(self, **kwargs):
        """Older packs (InstantID, IPAdapter before its Attn2Replace) stack through their own patch class's
        set_new_condition. That works when such a patch was applied before IDFusion (it is chained here);
        otherwise there is no patch of theirs to take the condition."""
        if hasattr(self.previous, "set_new_condition"):
            return self.previous.set_new_condition(**kwargs)
        raise AdapterError(f"A node applied after IDFusion tried to stack on IDFusion's attention patch at layer "
                           f"{self.layer.key} with set_new_condition (an older InstantID/IP-Adapter version). Apply that "
                           f"node before IDFusion, or update it: current versions stack with .add().")

    def release(self):
        """Drop what this patch keeps on the device (masks here, K_f/V_f in its Fusions); rebuilt on next use."""
        self._masks.clear()
        for f in self.fusions:
            f.release()

    def cached_tensors(self) -> list:
        return list(self._masks.values()) + [t for f in self.fusions for t in f.cached_tensors()]

    # ---- the attention ----------------------------------------------------------------------------
    def __call__(self, q, k, v, extra_options):
        out = self._fused(q, k, v, extra_options)
        if self.added:
            dtype = out.dtype
            sigma = extra_options.get("idfusion", {}).get("sigma")  # read once per step by the wrapper, not per layer
            if sigma is None:
                sigmas = extra_options.get("sigmas")
                sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else float("inf")
            for callback, kw in self.added:
                if kw.get("sigma_end", float("-inf")) <= sigma <= kw.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kw)
            out = out.to(dtype)
        return out

    def _fused(self, q, k, v, extra_options):
        states = extra_options.get("idfusion", {})
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        # a Fusion whose weight at this layer is 0 (per-block weights) is left out here, so on its own the layer
        # takes the plain path, bit-identical to the unpatched model
        per_chunk = [tuple(f for f in self.fusions
                           if states.get(f.uid, {"active": True})["active"] and (c == 0 or f.uncond)
                           and f.weight_at(self.layer) != 0)
                     for c in cond_or_uncond]
        if len(set(per_chunk)) == 1 or q.shape[0] % len(cond_or_uncond):
            return self._attend(q, k, v, per_chunk[0], extra_options, states)
        # CFG chunks that fuse different identities (e.g. uncond sees text only) are attended separately; each group
        # gets extra_options describing exactly its rows, so a chained patch picks the right per-chunk data
        bs = q.shape[0] // len(cond_or_uncond)
        out, first = [], 0
        for fusions, group in itertools.groupby(per_chunk):
            n = len(list(group))
            rows = slice(first * bs, (first + n) * bs)
            sub = chunk_options(extra_options, first, n, bs)
            out.append(self._attend(q[rows], k[rows], v[rows], fusions, sub, states))
            first += n
        return torch.cat(out)

    def _plain(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        from comfy.ldm.modules import attention  # read at call time: honours ComfyUI's attention choice
        fn = attention.optimized_attention
        kw = {"attn_precision": extra_options.get("attn_precision")}
        if _accepts_transformer_options(fn):
            kw["transformer_options"] = extra_options
        return fn(q, k, v, extra_options["n_heads"], **kw)

    def _attend(self, q, k, v, fusions, extra_options, states):
        if not fusions:
            return self._plain(q, k, v, extra_options)
        K_f, V_f, entries = [], [], []
        for f in fusions:
            for e, (kf, vf) in zip(f.entries, f.kv(self.layer, q.device, q.dtype, states.get(f.uid))):
                K_f.append(kf), V_f.append(vf), entries.append(e)
        K, V = fusion.concat_keys(k, v, K_f, V_f)
        if all(e.region is None for e in entries):
            return self._plain(q, K, V, extra_options)
        if self.previous is not None:
            raise AdapterError(f"IDFusion region masks cannot be combined with another node's attention replacement "
                               f"on layer {self.layer.key} ({type(self.previous).__name__}): apply that node after "
                               f"IDFusion, or use IDFusion without masks.")
        allow = self._mask(fusions, entries, [t.shape[0] for t in K_f], k.shape[1], q.shape[1], extra_options, q.device)
        return fusion.masked_attention(q, K, V, extra_options["n_heads"], allow)

    def _mask(self, fusions, entries, tokens, n_text, n_h, extra_options, device):
        h, w = token_grid(extra_options, n_h)
        key = (tuple(f.uid for f in fusions), tuple(tokens), n_text, h, w, device)
        if key not in self._masks:  # built once per layer and shape, reused every step
            inside = torch.stack([fusion.region_tokens(e.region, h, w) if e.region is not None
                                  else torch.zeros(h * w, dtype=torch.bool) for e in entries], dim=1)
            confine = torch.tensor([e.confine and e.region is not None for e in entries])
            blocked = fusion.blocked_identities(inside, confine)
            self._masks[key] = fusion.key_allow_mask(blocked, tokens, n_text).to(device)
        return self._masks[key]


def token_grid(extra_options, n_h: int):
    """(h, w) of this layer's query tokens, from the activation shape ComfyUI records, else derived from the
    latent shape by the UNet's stride-2 downsampling (ceil), so odd sizes work."""
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == n_h:
        return int(shape[-2]), int(shape[-1])
    H, W = extra_options["original_shape"][-2:]
    h, w = H, W
    while h * w > n_h:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_h:
        raise AdapterError(f"Cannot place {n_h} query tokens on a grid of latent {H}x{W}.")
    return h, w


def chunk_options(extra_options: dict, first: int, n: int, rows_per_chunk: int) -> dict:
    """extra_options for CFG chunks first..first+n-1 only: the per-chunk lists ComfyUI batches (cond_or_uncond,
    uuids) and the batch size in the recorded shapes agree with the rows handed over."""
    sub = dict(extra_options)
    chunks = len(extra_options.get("cond_or_uncond") or [0])
    for key in ("cond_or_uncond", "uuids"):
        value = extra_options.get(key)
        if isinstance(value, (list, tuple)) and len(value) == chunks:
            sub[key] = list(value[first:first + n])
    for key in ("original_shape", "activations_shape"):
        shape = extra_options.get(key)
        if isinstance(shape, (list, tuple)) and shape:
            sub[key] = [n * rows_per_chunk] + list(shape[1:])
    return sub


class BlockPatches:
    """What another pack finds under a (block, number) key when that block holds several attn2 layers (SDXL):
    its .add / set_new_condition reach every layer's LayerPatch. ComfyUI looks up (block, number, index) first,
    so it calls the LayerPatches directly; __call__ only serves code that calls the 2-tuple key itself."""

    def __init__(self, patches: dict):
        self.patches = patches  # transformer index -> LayerPatch (the same objects as on the 3-tuple keys)

    def add(self, callback, **kwargs):
        for p in self.patches.values():
            p.add(callback, **kwargs)

    def set_new_condition(self, **kwargs):
        for p in self.patches.values():
            p.set_new_condition(**kwargs)

    def __call__(self, q, k, v, extra_options):
        return self.patches[extra_options.get("block_index", 0)](q, k, v, extra_options)


RELEASE_KEY = "idfusion_release"


def ours(model_patcher) -> list[LayerPatch]:
    """The LayerPatches installed on this ModelPatcher (each once)."""
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    seen = {}
    for p in replaces.values():
        for lp in (p.patches.values() if isinstance(p, BlockPatches) else [p]):
            if isinstance(lp, LayerPatch):
                seen[id(lp)] = lp
    return list(seen.values())


def release_device_memory(model_patcher):
    """ON_CLEANUP callback (ModelPatcher.cleanup runs it when sampling ends, also on error or cancel): drop the
    K_f/V_f caches, Eq. 7 masks, per-step adapter weights and reference latents held on the device, which
    ComfyUI's memory manager cannot see or free."""
    for p in ours(model_patcher):
        p.release()


def cached_tensors(model_patcher) -> list:
    """Every tensor IDFusion currently keeps for this model (for tests and diagnostics), each once."""
    out = {}
    for p in ours(model_patcher):
        for t in p.cached_tensors():
            out[id(t)] = t
    return list(out.values())


def _has_region(fusions) -> bool:
    return any(e.region is not None for f in fusions for e in f.entries)


def install(model_patcher, fusion_: Fusion):
    """A clone of model_patcher with fusion_ patched into every attn2 layer (read off the model).

    Keys: (block, number, index) for every layer, which ComfyUI looks up first; and (block, number), where
    packs that use 2-tuple keys (IPAdapter_plus on SD1.5) look, so they find this patch and stack on it with
    .add instead of installing a patch that the 3-tuple key would silently shadow."""
    m = model_patcher.clone()  # read the clone's (deep-copied) patches, so nothing of the input is reused
    replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patches = {}
    for layer in fusion_.adapter.layers:
        block, number, index = layer.key
        prev = replaces.get(layer.key, replaces.get((block, number)))
        if isinstance(prev, BlockPatches):
            prev = prev.patches.get(index)
        if isinstance(prev, LayerPatch):  # another Apply: stack, keeping what it chained and what was added to it
            patch = LayerPatch(layer, prev.fusions + [fusion_], prev.previous, prev.added)
        else:
            patch = LayerPatch(layer, [fusion_], prev)
        if patch.previous is not None and _has_region(patch.fusions):
            raise AdapterError(f"IDFusion region masks cannot be combined with another node's attention replacement "
                               f"({type(patch.previous).__name__}) on layer {layer.key}: the masks would not reach it. "
                               f"Apply that node after IDFusion (packs that stack with .add, such as current "
                               f"IPAdapter_plus, InstantID and PuLID, work then), or use IDFusion without masks.")
        patches[layer.key] = patch
    by_block = {}
    for (block, number, index), patch in patches.items():
        m.set_model_attn2_replace(patch, block, number, index)
        by_block.setdefault((block, number), {})[index] = patch
    for (block, number), group in by_block.items():
        m.set_model_attn2_replace(next(iter(group.values())) if len(group) == 1 else BlockPatches(group), block, number)
    from comfy.patcher_extension import CallbacksMP, WrappersMP
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, f"{WRAPPER_KEY}_{fusion_.uid}", fusion_.apply_model_wrapper)
    if not m.get_callbacks(CallbacksMP.ON_CLEANUP, RELEASE_KEY):
        m.add_callback_with_key(CallbacksMP.ON_CLEANUP, RELEASE_KEY, release_device_memory)
    return m
