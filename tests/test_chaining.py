"""IDFusion next to another pack's attn2 patch, in both orders: the other pack here follows IPAdapter_plus's
convention (written for these tests, not copied): an Attn2Replace-style patch that computes text attention and adds
callbacks, `.add(callback, **kwargs)` to stack on a patch already on the key, per-chunk cond/uncond image embeddings
chosen from `cond_or_uncond`, a sigma window, 2-tuple keys on SD1.5 and 3-tuple keys on SDXL.

Every case checks each patched layer against float64 (IDFusion's Eqs. 1-7 from tests/helpers.py plus the other
pack's attention), that both effects are there, and that stacking never changes the input MODEL or a sibling
branch. Narrow UNets with the families' block layouts: the width is not the point here."""
import copy

import numpy as np
import pytest
import torch

import random_models
from helpers import attn2_recorder, fused_attention_reference, random_identity
from random_models import sampler_transformer_options
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter, attn2_modules, find_layers
from idfusion_pack.idfusion.patch import BlockPatches, Entry, Fusion, LayerPatch, install
from idfusion_pack.nodes import apply_nodes

SIGMA = 2.0


@pytest.fixture(scope="module")
def small():
    return {f: random_models.build_small_model(f, seed=7) for f in ("SD15", "SDXL")}


# ---- the other pack ----------------------------------------------------------------------------------------------
class StackingReplace:
    """An attn2 replace in IPAdapter_plus's style: text attention, then out += callback(...) for every stacked
    callback whose [sigma_end, sigma_start] window holds this step's sigma."""

    def __init__(self, callback, **kwargs):
        self.callbacks, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callbacks.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention
        out = optimized_attention(q, k, v, extra["n_heads"])
        sigma = float(extra["sigmas"].reshape(-1)[0]) if "sigmas" in extra else 1e9
        for cb, kw in zip(self.callbacks, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra, **kw)
        return out


def image_prompt_attention(out, q, k, v, extra, to_k_ip, to_v_ip, cond, uncond, weight, sigma_start, sigma_end):
    """The other pack's effect: attention to its own image tokens, the cond or the uncond embedding per CFG chunk
    (chosen from cond_or_uncond, each chunk q.shape[0] / len(cond_or_uncond) rows), scaled by weight."""
    from comfy.ldm.modules.attention import optimized_attention
    chunks = extra["cond_or_uncond"]
    rows = q.shape[0] // len(chunks)
    k_ip = [e @ to_k_ip.t() for e in (cond, uncond)]
    v_ip = [e @ to_v_ip.t() for e in (cond, uncond)]
    ip_k = torch.cat([k_ip[c].unsqueeze(0).repeat(rows, 1, 1) for c in chunks]).to(q.dtype)
    ip_v = torch.cat([v_ip[c].unsqueeze(0).repeat(rows, 1, 1) for c in chunks]).to(q.dtype)
    return optimized_attention(q, ip_k, ip_v, extra["n_heads"]) * weight


def foreign_keys(model):
    """SD1.5: (block, number) keys, SDXL: (block, number, index), as IPAdapter_plus installs them."""
    keys = [l.key for l in find_layers(model.model.diffusion_model)]
    return [k[:2] for k in keys] if model.model.model_config.__class__.__name__ == "SD15" else keys


def foreign_weights(model, seed, tokens=4, dim=24):
    g = torch.Generator().manual_seed(seed)
    layers = {l.key: l for l in find_layers(model.model.diffusion_model)}
    w = {key: (torch.randn(l.inner, dim, generator=g) / dim ** 0.5, torch.randn(l.inner, dim, generator=g) / dim ** 0.5)
         for key, l in layers.items()}
    return w, torch.randn(tokens, dim, generator=g) * 2, torch.randn(tokens, dim, generator=g) * 2


def apply_foreign(model, spec, weight=0.8, window=(1e9, 0.0)):
    """Like IPAdapter_plus's node: clone, then per key install a StackingReplace, or .add to what is there."""
    m = model.clone()
    w, cond, uncond = spec
    for key in foreign_keys(m):
        layer_key = key if len(key) == 3 else next(k for k in w if k[:2] == key)
        kwargs = dict(to_k_ip=w[layer_key][0], to_v_ip=w[layer_key][1], cond=cond, uncond=uncond, weight=weight,
                      sigma_start=window[0], sigma_end=window[1])
        to = m.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        attn2 = to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        if key not in attn2:
            attn2[key] = StackingReplace(image_prompt_attention, **kwargs)
            m.model_options["transformer_options"] = to
        else:
            attn2[key].add(image_prompt_attention, **kwargs)
    return m


# ---- running and the float64 reference ---------------------------------------------------------------------------
def run(model, x, context, chunks, y=None):
    """One UNet evaluation as ComfyUI's sampler makes it, capturing every attn2's input and output."""
    seen, patches = attn2_recorder()
    to = sampler_transformer_options(model, chunks)
    rows = x.shape[0] // len(chunks)
    to["sigmas"] = torch.full((rows,), SIGMA)
    to["uuids"] = [f"chunk{i}" for i in range(len(chunks))]
    to["patches"] = patches
    kwargs = {"y": y} if y is not None else {}
    with torch.inference_mode():
        model.model.apply_model(x, torch.full((x.shape[0],), SIGMA), c_crossattn=context, transformer_options=to, **kwargs)
    return seen


def foreign_reference(n, attn2, spec, weight, chunks):
    """The other pack's addition to attn2's output, float64: weight * to_out.weight @ softmax(Q K_ip^T) V_ip."""
    d = lambda t: t.detach().to(torch.float64).numpy()
    w_all, cond, uncond = spec
    Wq, Wo = d(attn2.to_q.weight), d(attn2.to_out[0].weight)
    heads = attn2.heads
    n = d(n)
    rows = n.shape[0] // len(chunks)
    out = np.zeros((n.shape[0], n.shape[1], Wq.shape[0]))
    for b in range(n.shape[0]):
        emb = d(cond if chunks[b // rows] == 0 else uncond)
        Q, K, V = n[b] @ Wq.T, emb @ d(w_all[0]).T, emb @ d(w_all[1]).T
        dh = Q.shape[1] // heads
        for h in range(heads):
            s = slice(h * dh, (h + 1) * dh)
            logits = Q[:, s] @ K[:, s].T / np.sqrt(dh)
            p = np.exp(logits - logits.max(1, keepdims=True))
            out[b, :, s] = (p / p.sum(1, keepdims=True)) @ V[:, s]
    return weight * out @ Wo.T


def inputs(model, batch, seed=3):
    cfg = model.model.model_config.unet_config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch, 4, 8, 8, generator=g)
    context = torch.randn(2 * batch, 8, cfg["context_dim"], generator=g)
    y = torch.randn(2 * batch, cfg["adm_in_channels"], generator=g) if cfg.get("adm_in_channels") else None
    return x, context, y


def check_layers(model, seen, context, adapter, ids, regions, spec, weight, chunks, with_identity=True, with_foreign=True):
    """Each layer's output against float64; returns each effect's relative size per layer."""
    modules = attn2_modules(model.model.diffusion_model)
    rows = context.shape[0] // len(chunks)
    cond_rows = [chunks[b // rows] == 0 for b in range(context.shape[0])]
    effect = {"identity": [], "foreign": []}
    for layer in adapter.layers:
        s, attn2 = seen[layer.key], modules[layer.key][1]
        text = fused_attention_reference(s["n"], context, attn2, adapter, layer, [], [], 1.0, cond_rows, s["hw"])
        fused = fused_attention_reference(s["n"], context, attn2, adapter, layer, ids if with_identity else [],
                                          regions if with_identity else [], 1.0, cond_rows, s["hw"])
        extra = foreign_reference(s["n"], attn2, (spec[0][layer.key], spec[1], spec[2]), weight, chunks) if with_foreign else 0
        ref = fused + extra
        got = s["out"].double().numpy()
        scale = np.abs(ref).max()
        rel = np.abs(got - ref).max() / scale
        assert rel < 1e-5, f"layer {layer.key}: max relative error {rel:.2e} against float64"
        if with_identity:
            effect["identity"].append(np.abs(fused - text).max() / scale)
        if with_foreign:
            effect["foreign"].append(np.abs(extra).max() / scale)
    return effect


def options_snapshot(model):
    """What a later node could have changed on a model: its attn2 replaces, their chained patches and stacked callbacks."""
    out = {}
    for key, p in model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}).items():
        for lp in (p.patches.values() if isinstance(p, BlockPatches) else [p]):
            out.setdefault(key, []).append((id(lp), len(getattr(lp, "added", [])), len(getattr(lp, "callbacks", [])),
                                            id(getattr(lp, "previous", None)), len(getattr(getattr(lp, "previous", None), "callbacks", []))))
    return out


# ---- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["SD15", "SDXL"])
@pytest.mark.parametrize("order", ["other pack, then IDFusion", "IDFusion, then other pack"])
def test_both_effects_in_both_orders_match_float64(small, family, order, batch):
    model = small[family]
    adapter = IDFusionAdapter.fresh(model, init="random", seed=4)
    ident = random_identity(model, tokens=(5,), seed=11)
    spec = foreign_weights(model, seed=5)
    before = options_snapshot(model)
    if order == "other pack, then IDFusion":
        first = apply_foreign(model, spec)
        snap = options_snapshot(first)
        patched = install(first, Fusion(adapter, [Entry(ident)]))
        assert options_snapshot(first) == snap
    else:
        first = install(model, Fusion(adapter, [Entry(ident)]))
        snap = options_snapshot(first)
        patched = apply_foreign(first, spec)
        # a second pack on a sibling branch, and a callback outside its sigma window (must not act at SIGMA)
        sibling = apply_foreign(first, foreign_weights(model, seed=9), weight=3.0)
        patched = apply_foreign(patched, foreign_weights(model, seed=6), weight=5.0, window=(1.0, 0.5))
        assert options_snapshot(first) == snap
        assert sibling is not patched
    assert options_snapshot(model) == before
    x, context, y = inputs(model, batch)
    chunks = [1, 0]                          # ComfyUI batches CFG as [uncond rows, cond rows]
    seen = run(patched, x, context, chunks, y)
    effect = check_layers(patched, seen, context, adapter, [ident], [None], spec, 0.8, chunks)
    assert min(effect["identity"]) > 1e-3 and min(effect["foreign"]) > 1e-3, f"an effect is missing: {effect}"
    # the input and the first branch still give what they gave alone
    alone = run(first, x, context, chunks, y)
    check_layers(first, alone, context, adapter, [ident], [None], spec, 0.8, chunks,
                 with_foreign=order == "other pack, then IDFusion", with_identity=order == "IDFusion, then other pack")


def test_identity_too_sends_identity_to_both_chunks_with_the_other_pack(small):
    """uncond = identity too: no row split; the other pack still sees its per-chunk embeddings."""
    model = small["SD15"]
    adapter = IDFusionAdapter.fresh(model, init="random", seed=4)
    ident = random_identity(model, tokens=(5,), seed=11)
    spec = foreign_weights(model, seed=5)
    patched = install(apply_foreign(model, spec), Fusion(adapter, [Entry(ident)], uncond=True))
    x, context, y = inputs(model, 2)
    seen = run(patched, x, context, [1, 0], y)
    modules = attn2_modules(model.model.diffusion_model)
    for layer in adapter.layers:
        s, attn2 = seen[layer.key], modules[layer.key][1]
        ref = (fused_attention_reference(s["n"], context, attn2, adapter, layer, [ident], [None], 1.0, [True] * 4, s["hw"])
               + foreign_reference(s["n"], attn2, (spec[0][layer.key], spec[1], spec[2]), 0.8, [1, 0]))
        assert np.abs(s["out"].double().numpy() - ref).max() / np.abs(ref).max() < 1e-5


def test_masks_then_other_pack_keeps_eq7_and_adds_its_effect(small):
    model = small["SD15"]
    adapter = IDFusionAdapter.fresh(model, init="random", seed=4)
    ids = [random_identity(model, tokens=(4,), seed=20), random_identity(model, tokens=(3,), seed=21)]
    regions = [torch.zeros(64, 64), torch.zeros(64, 64)]
    regions[0][:, :28] = 1
    regions[1][:, 36:] = 1
    spec = foreign_weights(model, seed=5)
    patched = apply_foreign(install(model, Fusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)])), spec)
    x, context, y = inputs(model, 1)
    seen = run(patched, x, context, [1, 0], y)
    effect = check_layers(patched, seen, context, adapter, ids, regions, spec, 0.8, [1, 0])
    # on the 1x1 grid both regions hold the only token, so Eq. 7 hides both identities there: judge the other layers
    assert sorted(effect["identity"])[1] > 1e-3 and min(effect["foreign"]) > 1e-3


def test_masks_with_a_foreign_patch_underneath_are_refused_at_the_apply_node(small):
    model = small["SD15"]
    adapter = IDFusionAdapter.fresh(model, init="random", seed=4)
    ids = [random_identity(model, tokens=(4,), seed=20), random_identity(model, tokens=(3,), seed=21)]
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :28] = 1
    masks[1, :, 36:] = 1
    under = apply_foreign(model, foreign_weights(model, seed=5))
    multi = apply_nodes.IDFusionApplyMultiIdentity()
    with torch.inference_mode():
        with pytest.raises(AdapterError, match=r"region masks cannot be combined with another node's attention.*StackingReplace"):
            multi.apply(under, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached", identity_1=ids[0], identity_2=ids[1])
        # also when an unmasked IDFusion Apply sits between them (the foreign patch is chained inside it)
        plain = apply_nodes.IDFusionApply().apply(under, adapter, ids[0], 1.0, 0.0, 1.0, "text only", "cached")[0]
        with pytest.raises(AdapterError, match="region masks cannot be combined"):
            multi.apply(plain, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached", identity_1=ids[0], identity_2=ids[1])
        with pytest.raises(AdapterError, match="region masks cannot be combined"):
            apply_nodes.IDFusionApply().apply(under, adapter, ids[0], 1.0, 0.0, 1.0, "text only", "cached", attn_mask=masks[:1])


def test_clone_gets_its_own_patch_and_keys_other_packs_look_up(small):
    """SD1.5: the (block, number) key holds the same LayerPatch as (block, number, 0); SDXL: a BlockPatches that
    reaches each layer. A deep copy (ModelPatcher.clone) copies the patch, shares the Fusion."""
    for family, n_layers in (("SD15", 16), ("SDXL", 22)):
        model = small[family]
        adapter = IDFusionAdapter.fresh(model, init="zeros")
        patched = install(model, Fusion(adapter, [Entry(random_identity(model, tokens=(2,)))]))
        attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert len(adapter.layers) == n_layers
        for l in adapter.layers:
            alias = attn2[l.key[:2]]
            assert (alias is attn2[l.key]) if family == "SD15" else (isinstance(alias, BlockPatches) and alias.patches[l.key[2]] is attn2[l.key])
        clone = patched.clone()
        c2 = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
        for l in adapter.layers:
            assert c2[l.key] is not attn2[l.key] and isinstance(c2[l.key], LayerPatch)
            assert c2[l.key].fusions[0] is attn2[l.key].fusions[0]
            alias = c2[l.key[:2]]
            assert (alias is c2[l.key]) if family == "SD15" else alias.patches[l.key[2]] is c2[l.key]
        copy.deepcopy(patched.model_options)  # no error, no shared mutable state (checked above)


def test_set_new_condition_after_idfusion_reaches_a_chained_patch_or_says_what_to_do(small):
    class OldStylePatch(StackingReplace):  # an older pack's patch class with set_new_condition
        def set_new_condition(self, **kwargs):
            self.add(image_prompt_attention, **kwargs)

    model = small["SD15"]
    adapter = IDFusionAdapter.fresh(model, init="zeros")
    ident = random_identity(model, tokens=(2,))
    lone = install(model, Fusion(adapter, [Entry(ident)]))
    key = adapter.layers[0].key
    with pytest.raises(AdapterError, match="set_new_condition.*Apply that node before IDFusion, or update it"):
        lone.clone().model_options["transformer_options"]["patches_replace"]["attn2"][key].set_new_condition(weight=1.0)
    base = model.clone()
    base.set_model_attn2_replace(OldStylePatch(image_prompt_attention, sigma_start=1e9, sigma_end=0.0), *key)
    chained = install(base, Fusion(adapter, [Entry(ident)]))
    branch = chained.clone()
    branch.model_options["transformer_options"]["patches_replace"]["attn2"][key].set_new_condition(sigma_start=1e9, sigma_end=0.0)
    got = branch.model_options["transformer_options"]["patches_replace"]["attn2"][key].previous
    assert len(got.callbacks) == 2
    assert len(chained.model_options["transformer_options"]["patches_replace"]["attn2"][key].previous.callbacks) == 1
    assert len(base.model_options["transformer_options"]["patches_replace"]["attn2"][key].callbacks) == 1
