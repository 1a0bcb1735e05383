"""Apply nodes: patch a clone of MODEL with one identity, or several identities placed by region masks."""
import logging
import math
import re

import torch

from ..idfusion import fusion
from ..idfusion.families import glue_for
from ..idfusion.patch import Entry
from .common import CATEGORY, check_inputs, require_inputs
from .previews import region_legend, region_overlay, save_temp_png

log = logging.getLogger("IDFusion")
MAX_IDENTITIES = 4

_COMMON = {
    "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
               "Scales V_f, the identity's values. 0 switches IDFusion off (the output equals the unpatched model's)."}),
    "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of sampling at which the identity starts to act."}),
    "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of sampling after which the identity stops acting."}),
    "uncond": (["text only", "identity too"], {"tooltip":
               "What the negative/uncond CFG branch sees. 'text only' (default): plain text attention, so CFG pushes towards "
               "the identity. 'identity too': both branches see the identity (weaker, CFG no longer amplifies it)."}),
    "mode": (["adapter default", "cached", "per_step"], {"tooltip":
             "cached: the reference's h_f from one clean pass (fast). per_step: re-encode the reference, noised to the "
             "current sigma, at every step (the paper's literal reading; ~2x slower). 'adapter default' uses the mode the adapter was trained with."}),
}


# optional, so API workflows saved before these inputs existed keep working
POOLED = "2x2 pooled at the highest resolution"
REFERENCE_TOKENS = {"all": "all", POOLED: "pooled", "pooled": "pooled"}  # label -> Fusion's value
_OPTIONS = {
    "reference_tokens": (["all", POOLED], {"default": "all", "tooltip":
                         "all (default): every reference token at every layer. 2x2 pooled: on the highest-resolution attention "
                         "layers the reference's tokens are averaged 2x2, 4x fewer keys where they cost most: a 512² SD1.5 "
                         "step costs 1.08x the plain step instead of 1.24x, but identity accuracy dropped by 3.9 points on the "
                         "pack's synthetic test (benchmarks/README.md)."}),
    "block_weights": ("STRING", {"default": "", "multiline": False, "tooltip":
                      "Per-block weights, multiplying weight (empty: 1 everywhere). Groups 'input:1, middle:0.5, output:1' "
                      "and/or attn2 layer indices as in IPAdapter's layer_weights, '0:1, 5:0' (the adapter's layer order: "
                      "SD1.5 has 16, SDXL 70). Flux: groups 'double:1, single:0.5' and block indices (double blocks first). "
                      "An index overrides its group. 0 leaves that layer exactly as without IDFusion."}),
}
GROUPS = ("input", "middle", "output", "double", "single")  # UNet attn2 groups; Flux blocks
MAX_BLOCK_WEIGHT = 10.0  # a factor on weight (itself at most 3); 'input:1e300' overflowed V_f into a black image


def parse_block_weights(text: str, layers) -> dict:
    """block_weights -> {layer name: factor on weight}; empty -> {} (every layer 1). Groups (input, middle, output)
    and layer indices (into `layers`, the adapter's order) mix; an index overrides its layer's group."""
    text = (text or "").strip()
    if not text:
        return {}
    n = len(layers)
    present = list(dict.fromkeys(l.key[0] for l in layers))
    unit = "blocks" if set(present) <= {"double", "single"} else "attn2 layers"
    example = "'double:1, single:0.5'" if unit == "blocks" else "'input:1, middle:0.5, output:1'"
    howto = (f"write e.g. {example} or '0:1, 5:0' (groups {', '.join(present)}, or {unit[:-1]} "
             f"indices 0-{n - 1}: this model has {n} {unit})")
    groups, indices = {}, {}
    for item in re.split(r"[,;\n]", text):
        item = item.strip()
        if not item:
            continue
        name, sep, value = (p.strip() for p in item.partition(":"))
        item = item if len(item) <= 40 else item[:37] + "..."  # messages quote it; a typed value can be any length
        name = name.lower()
        if not sep or not name or not value:
            raise ValueError(f"block_weights: '{item}' is not 'name:value'; {howto}.")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"block_weights: '{value[:40]}' in '{item}' is not a number; {howto}.") from None
        if not math.isfinite(v) or not 0 <= v <= MAX_BLOCK_WEIGHT:
            raise ValueError(f"block_weights: '{item}' has weight {value[:40]}; give a finite number >= 0, "
                             f"at most {MAX_BLOCK_WEIGHT:g} (0 switches the layer off, 1 keeps weight as it is).")
        if name in GROUPS:
            if not any(l.key[0] == name for l in layers):
                raise ValueError(f"block_weights: this model has no {name} {unit}; {howto}.")
            table, key, what = groups, name, f"group '{name}'"
        elif re.fullmatch(r"[+-]?[0-9]+", name):  # ASCII digits; int() of a 5000-digit index hits Python's digit limit
            key = int(name) if len(name) <= 6 else None
            if key is None or not 0 <= key < n:
                raise ValueError(f"block_weights: layer index {name[:12] + ('...' if len(name) > 12 else '')} in "
                                 f"'{item}' is out of range: this model has {n} {unit}, indices 0-{n - 1}.")
            table, what = indices, f"layer {key}"
        else:
            raise ValueError(f"block_weights: unknown group '{name}' in '{item}'; {howto}.")
        if key in table:
            raise ValueError(f"block_weights: {what} is given twice ('{table[key][1]}' and '{item}'); keep one.")
        table[key] = (v, item)
    out = {}
    for i, l in enumerate(layers):
        f = indices.get(i, groups.get(l.key[0]))
        if f is not None:
            out[l.name] = f[0]
    return out


def _apply(model, adapter, entries, weight, start_at, end_at, uncond, mode, reference_tokens="all", block_weights=""):
    """Validate everything, then return (patched clone,); weight 0 (everywhere) returns an unpatched clone."""
    # again here, not only in VALIDATE_INPUTS: a linked value, or a Python caller, is not validated by ComfyUI
    require_inputs(IDFusionApply, {"reference_tokens": REFERENCE_TOKENS}, weight=weight, start_at=start_at,
                   end_at=end_at, reference_tokens=reference_tokens)
    if start_at >= end_at:
        raise ValueError(f"start_at ({start_at}) must be smaller than end_at ({end_at}).")
    if reference_tokens not in REFERENCE_TOKENS:
        raise ValueError(f"reference_tokens is {reference_tokens!r}; choose 'all' or '{POOLED}'.")
    glue = glue_for(model)  # UNet (patch.py) or Flux DiT (patch_flux.py)
    problem = glue.missing_hooks()
    if problem:
        raise ValueError(problem)
    glue.check_adapter(adapter, model)
    layer_weights = parse_block_weights(block_weights, adapter.layers)  # before anything is computed or installed
    if mode == "adapter default":
        mode = adapter.encoding.get("mode", "cached")
    for e in entries:  # layers, and the reference pass's inputs (a shared compact file), before any pass runs
        glue.check_identity(e.identity, model, mode)
        _warn_encoding(adapter, e.identity)
    if weight == 0 or all(layer_weights.get(l.name, 1.0) == 0 for l in adapter.layers):
        return (model.clone(),)
    for e in entries:  # h_f of references loaded from compact files: one reference pass each, through this model
        e.identity = glue.identity_for_model(e.identity, model)
    ms = model.get_model_object("model_sampling")
    return (glue.install(model, glue.Fusion(adapter, entries, weight, sigma_start=float(ms.percent_to_sigma(start_at)),
                                  sigma_end=float(ms.percent_to_sigma(end_at)), uncond=(uncond == "identity too"), mode=mode,
                                  reference_tokens=REFERENCE_TOKENS[reference_tokens], layer_weights=layer_weights)),)


def _validate(cls, weight, start_at, end_at, reference_tokens):
    """ComfyUI's VALIDATE_INPUTS: refuses NaN/inf (which pass its own min/max check) before the prompt runs, and
    accepts the 'pooled' alias of reference_tokens. Listing an input here turns off ComfyUI's own check of it, so
    check_inputs repeats min/max and the choice list."""
    return check_inputs(cls, {"reference_tokens": REFERENCE_TOKENS}, weight=weight, start_at=start_at, end_at=end_at,
                        reference_tokens=reference_tokens)


def _warn_encoding(adapter, identity):
    for k in ("timestep", "text"):
        a, i = adapter.encoding.get(k), identity.encoding.get(k)
        if a is not None and i is not None and a != i:
            log.warning("IDFusion: identity '%s' was encoded with %s=%r but the adapter was trained with %s=%r; "
                        "re-encode the reference to match for best results.", identity.name, k, i, k, a)


def _region(mask, what, fix_batch="give one mask"):
    """A region mask (H, W) on the CPU, or a clear error naming `what`: a batch of several masks, NaN/Inf values,
    nothing painted."""
    m = mask.float()
    if m.ndim == 3:
        if m.shape[0] != 1:
            raise ValueError(f"{what} is a batch of {m.shape[0]} masks, but it takes one: {fix_batch}.")
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{what} must be a MASK of shape (H, W) or (1, H, W), got {tuple(mask.shape)}.")
    bad = ~torch.isfinite(m)
    if bool(bad.any()):
        nan = int(torch.isnan(m).sum())
        where = "everywhere" if bool(bad.all()) else f"in {int(bad.sum())} of {m.numel()} pixels"
        kind = "NaN" if nan == int(bad.sum()) else ("Inf" if nan == 0 else "NaN/Inf")
        raise ValueError(f"{what} is {kind} {where} (not a number, so no region can be read from it): the node that made "
                         f"the mask produced invalid values (e.g. a division by zero); fix that node or paint the mask again.")
    if not bool((m > 0).any()):
        raise ValueError(f"{what} is empty (all zero): paint the region where this identity's face should appear.")
    return m.cpu()


def check_regions(regions: list, names: list[str]):
    """Eq. 7 hides every other identity inside a region. An identity whose whole region lies inside other regions
    (complete overlap, or another mask covering the whole frame) would never be visible where it should appear:
    refuse that here, at the mask's resolution and with the layers' own inside rule, instead of silently generating
    without it."""
    if len(regions) < 2:
        return
    h, w = regions[0].shape
    for n, r in zip(names, regions):
        if tuple(r.shape) != (h, w):
            raise ValueError(f"{n} is {tuple(r.shape)} but {names[0]} is {(h, w)}: give all masks one size.")
    inside = torch.stack([fusion.region_tokens(r, h, w) for r in regions])  # (n, h*w), as the layers decide
    full = [n for n, i in zip(names, inside) if bool(i.all())]
    for i, name in enumerate(names):
        others = torch.cat([inside[:i], inside[i + 1:]])
        if not bool((inside[i] & ~others.any(0)).any()):
            covering = [names[j] for j in range(len(names)) if j != i and bool((inside[i] & inside[j]).any())]
            why = (f"{' and '.join(full)} cover{'s' if len(full) == 1 else ''} the whole frame" if any(f != name for f in full)
                   else f"it lies entirely inside {', '.join(covering)}")
            raise ValueError(f"{name}: identity {i + 1} would never be visible, because {why}; inside another identity's "
                             f"region every other identity is hidden (Eq. 7). Make each mask cover only its own person's "
                             f"area; masks may overlap partly, but each needs some area of its own.")


class IDFusionApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch. The input stays unpatched; a patched clone is returned."}),
            "adapter": ("IDFUSION_ADAPTER", {"tooltip": "From IDFusion Load Adapter (or New Adapter)."}),
            "identity": ("IDFUSION_IDENTITY", {"tooltip": "From IDFusion Encode Reference Face or Load Identity."}),
            **_COMMON,
        }, "optional": {
            "attn_mask": ("MASK", {"tooltip": "Optional: the identity only acts on image regions inside this mask."}),
            **_OPTIONS,
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose cross-attention also attends to the identity's K_f/V_f.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    VALIDATE_INPUTS = classmethod(lambda cls, weight=None, start_at=None, end_at=None, reference_tokens=None:
                                  _validate(cls, weight, start_at, end_at, reference_tokens))
    DESCRIPTION = ("Fuses a reference identity into every cross-attention layer: K' = [K_text; K_f], V' = [V_text; V_f]. "
                   "Chain several Apply nodes to add more identities.")

    def apply(self, model, adapter, identity, weight, start_at, end_at, uncond, mode, attn_mask=None,
              reference_tokens="all", block_weights=""):
        region = None if attn_mask is None else _region(attn_mask, "attn_mask", "connect a single mask, or use IDFusion Apply "
                                                        "Multi-Identity with one mask per identity")
        entry = Entry(identity, region, confine=True)
        return _apply(model, adapter, [entry], weight, start_at, end_at, uncond, mode, reference_tokens, block_weights)


class IDFusionApplyMultiIdentity:
    @classmethod
    def INPUT_TYPES(cls):
        ids = {f"identity_{i}": ("IDFUSION_IDENTITY", {"tooltip": f"Identity {i}; its face goes where mask {i} is."})
               for i in range(1, MAX_IDENTITIES + 1)}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (a patched clone is returned)."}),
            "adapter": ("IDFUSION_ADAPTER", {"tooltip": "From IDFusion Load Adapter."}),
            "masks": ("MASK", {"tooltip": "One mask per connected identity, as a batch in identity order (mask i = region of identity i)."}),
            "identity_1": ids.pop("identity_1"),
            **_COMMON,
        }, "optional": {**ids, **_OPTIONS}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model with every identity placed in its region. The node shows each region as "
                       "the layers read it, one colour per identity (identity 1-4: red, green, blue, orange).",)
    FUNCTION = "apply_with_preview"
    CATEGORY = CATEGORY
    VALIDATE_INPUTS = classmethod(lambda cls, weight=None, start_at=None, end_at=None, reference_tokens=None:
                                  _validate(cls, weight, start_at, end_at, reference_tokens))
    DESCRIPTION = ("Several people in one image (paper section 3.4): inside identity j's region, the other identities' keys are "
                   "masked out (Eq. 7), so faces do not morph into each other. Outside all regions every identity is visible.")

    def apply(self, model, adapter, masks, weight, start_at, end_at, uncond, mode, reference_tokens="all",
              block_weights="", **identities):
        """The patched model, as a tuple (for Python callers); ComfyUI calls apply_with_preview."""
        return self._place(model, adapter, masks, weight, start_at, end_at, uncond, mode, reference_tokens, block_weights,
                           **identities)[0]

    def apply_with_preview(self, model, adapter, masks, weight, start_at, end_at, uncond, mode, reference_tokens="all",
                           block_weights="", **identities):
        result, regions = self._place(model, adapter, masks, weight, start_at, end_at, uncond, mode, reference_tokens,
                                      block_weights, **identities)
        names = [identities[k].name for k in sorted(identities) if identities[k] is not None]
        return {"ui": {"images": [save_temp_png(region_overlay(regions), "IDFusion_regions")],
                       "idfusion_regions": region_legend([f"identity {i + 1}: {n}" for i, n in enumerate(names)])},
                "result": result}

    def _place(self, model, adapter, masks, weight, start_at, end_at, uncond, mode, reference_tokens="all",
               block_weights="", **identities):
        names = [k for k in sorted(identities) if identities[k] is not None]
        ids = [identities[k] for k in names]
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape[0] != len(ids):
            extra = (f"connect an identity for each extra mask or drop masks {len(ids) + 1}-{masks.shape[0]} from the batch"
                     if masks.shape[0] > len(ids) else "give one mask per identity, in the same order")
            raise ValueError(f"masks has {masks.shape[0]} mask(s) but {len(ids)} identit{'y is' if len(ids) == 1 else 'ies are'} "
                             f"connected ({', '.join(names)}): {extra}.")
        regions = [_region(m, f"mask {n + 1}") for n, m in enumerate(masks)]
        check_regions(regions, [f"mask {n + 1}" for n in range(len(regions))])
        entries = [Entry(i, r) for i, r in zip(ids, regions)]
        return _apply(model, adapter, entries, weight, start_at, end_at, uncond, mode, reference_tokens, block_weights), regions


class IDFusionMaskBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask_1": ("MASK", {"tooltip": "Region of identity 1."}),
                             "mask_2": ("MASK", {"tooltip": "Region of identity 2."})},
                "optional": {f"mask_{i}": ("MASK", {"tooltip": f"Region of identity {i}."}) for i in range(3, MAX_IDENTITIES + 1)}}

    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("masks",)
    FUNCTION = "batch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Stacks region masks (resized to mask_1's size) into one batch for IDFusion Apply Multi-Identity."

    def batch(self, **masks):
        names = [k for k in sorted(masks) if masks[k] is not None]
        ms = [masks[k] for k in names]
        for name, m in zip(names, ms):  # a batch here would silently lose masks or shift identities
            if m.ndim == 3 and m.shape[0] != 1:
                raise ValueError(f"{name} is a batch of {m.shape[0]} masks; Mask Batch takes one mask per input (mask i = "
                                 f"region of identity i). Pick one mask from the batch, or connect the batch to Apply "
                                 f"Multi-Identity's masks directly.")
        ms = [m[None] if m.ndim == 2 else m for m in ms]
        size = ms[0].shape[-2:]
        out = [m if m.shape[-2:] == size else torch.nn.functional.interpolate(m[None].float(), size=size, mode="bilinear")[0] for m in ms]
        return (torch.cat(out),)


NODE_CLASS_MAPPINGS = {"IDFusionApply": IDFusionApply, "IDFusionApplyMultiIdentity": IDFusionApplyMultiIdentity,
                       "IDFusionMaskBatch": IDFusionMaskBatch}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionApply": "IDFusion Apply", "IDFusionApplyMultiIdentity": "IDFusion Apply Multi-Identity",
                              "IDFusionMaskBatch": "IDFusion Mask Batch"}
