"""Every attn2 layer is patched exactly once per forward (SD1.5: 16, SDXL: 70), other packs' replace
patches are chained, and the Eq. 7 mask gives exactly zero attention to other identities' keys.

The UNets have the families' real block layouts (layer keys, transformers per block, ADM) at a narrow width: the
layer count is the point here, not the width (a full-width SDXL costs ~5 GB and minutes per forward on a CPU)."""
import pytest
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock

import random_models
from helpers import random_identity
from random_models import sampler_transformer_options
from idfusion_pack.idfusion.adapter import IDFusionAdapter, Layer
from idfusion_pack.idfusion.identity import Identity
from idfusion_pack.idfusion.patch import Entry, Fusion, LayerPatch, install


class CountingReplace:
    """Another pack's attn2 replace: plain attention, counting calls and the key count it receives."""

    def __init__(self, inner=None):
        self.calls, self.keys, self.inner = {}, {}, inner

    def __call__(self, q, k, v, extra):
        key = (extra["block"][0], extra["block"][1], extra["block_index"])
        self.calls[key] = self.calls.get(key, 0) + 1
        self.keys[key] = k.shape[1]
        if self.inner is not None:
            return self.inner[key](q, k, v, extra)
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra["n_heads"])


def forward(model_patcher, latent_hw=(8, 8), batch=2):
    cfg = model_patcher.model.model_config.unet_config
    dtype = model_patcher.model.get_dtype()
    x = torch.randn(batch, 4, *latent_hw)
    kwargs = {"y": torch.zeros(batch, cfg["adm_in_channels"])} if cfg.get("adm_in_channels") else {}
    to = sampler_transformer_options(model_patcher, [0] * batch)
    with torch.no_grad():
        model_patcher.model.apply_model(x, torch.full((batch,), 1.0), c_crossattn=torch.randn(batch, 77, cfg["context_dim"]).to(dtype),
                                        transformer_options=to, **kwargs)


@pytest.fixture(scope="module")
def layouts():
    return {f: random_models.build_small_model(f, seed=2, real_depth=True) for f in ("SD15", "SDXL")}


@pytest.mark.parametrize("family,expected", [("SD15", 16), ("SDXL", 70)])
def test_every_attn2_layer_patched_exactly_once_per_forward(layouts, family, expected):
    model = layouts[family]
    n_attn2 = sum(1 for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None)
    assert n_attn2 == expected
    adapter = IDFusionAdapter.fresh(model, init="zeros")
    assert len(adapter.layers) == expected
    ident = random_identity(model, tokens=(3,))
    # another pack got there first: ours must chain to it (it receives K' = [K_c; K_f]), not replace it
    foreign = CountingReplace()
    base = model.clone()
    for l in adapter.layers:
        base.set_model_attn2_replace(foreign, *l.key)
    patched = install(base, Fusion(adapter, [Entry(ident)]))
    # and count calls of our own patches from outside
    ours = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    outer = CountingReplace(inner=dict(ours))
    for l in adapter.layers:
        patched.set_model_attn2_replace(outer, *l.key)
    forward(patched)
    keys = {l.key for l in adapter.layers}
    assert outer.calls == {k: 1 for k in keys}
    # ModelPatcher.clone() deep-copies model_options, so the chained patch is the clone's copy of `foreign`
    chained = {id(ours[k].previous) for k in keys}
    assert all(isinstance(ours[k], LayerPatch) and isinstance(ours[k].previous, CountingReplace) for k in keys)
    assert len(chained) == 1
    inner_foreign = ours[adapter.layers[0].key].previous
    assert inner_foreign.calls == {k: 1 for k in keys}
    assert set(inner_foreign.keys.values()) == {77 + 3}


def test_two_applies_stack_into_one_patch_with_both_identities(layouts):
    sd15 = layouts["SD15"]
    adapter = IDFusionAdapter.fresh(sd15, init="zeros")
    a, b = random_identity(sd15, tokens=(2,), seed=1), random_identity(sd15, tokens=(5,), seed=2)
    once = install(sd15, Fusion(adapter, [Entry(a)]))
    twice = install(once, Fusion(adapter, [Entry(b)]))
    outer = CountingReplace(inner=dict(twice.model_options["transformer_options"]["patches_replace"]["attn2"]))
    # the second Apply must not wrap the first (that would attend twice); one patch holds both identities
    patch = twice.model_options["transformer_options"]["patches_replace"]["attn2"][adapter.layers[0].key]
    assert len(patch.fusions) == 2 and patch.previous is None
    # and the first model is left as it was
    assert len(once.model_options["transformer_options"]["patches_replace"]["attn2"][adapter.layers[0].key].fusions) == 1
    for l in adapter.layers:
        twice.set_model_attn2_replace(outer, *l.key)
    forward(twice)
    assert set(outer.calls.values()) == {1}


def _mass_setup(n_ids=3, C=16, heads=2, h=7, w=5):
    """A one-layer adapter whose V_f is an indicator of the identity in head 0: output[q, i] is then the
    attention probability mass that query q puts on identity i's keys."""
    layer = Layer(("input", 1, 0), C, C, heads)
    adapter = IDFusionAdapter([layer])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapter.to_k_f[layer.name].weight.copy_(torch.randn(C, C, generator=g))
        adapter.to_v_f[layer.name].weight.copy_(torch.eye(C))
    ids = []
    for i in range(n_ids):
        h_f = torch.zeros(4 + i, C)
        h_f[:, i] = 1.0                                  # V_f head-0 dims: indicator of identity i
        h_f[:, C // 2:] = torch.randn(4 + i, C // 2, generator=g)  # vary the keys through head 1 dims
        ids.append(Identity([layer], "test", {}, [{layer.name: h_f}], [torch.zeros(1, 4, 1, 1)], torch.zeros(1, 77, 8)))
    return layer, adapter, ids


def test_queries_inside_another_identity_region_give_exactly_zero_mass(tmp_path):
    h, w = 7, 5
    layer, adapter, ids = _mass_setup(h=h, w=w)
    H, W = 56, 40
    regions = [torch.zeros(H, W) for _ in ids]
    regions[0][:, :16] = 1          # left
    regions[1][:, 24:] = 1          # right
    regions[2][:24, 8:32] = 1       # top, overlapping both
    patch = LayerPatch(layer, [Fusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)])])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, h * w, 16, generator=g)
    k = torch.randn(2, 77, 16, generator=g)
    v = torch.zeros(2, 77, 16)
    extra = {"n_heads": 2, "activations_shape": [2, 16, h, w], "cond_or_uncond": [0, 0]}
    out = patch(q, k, v, extra)
    mass = out[:, :, :3]            # (b, N_h, identity)
    inside = torch.stack([torch.nn.functional.interpolate(r[None, None], size=(h, w), mode="area")[0, 0].flatten() > 0.5 for r in regions], 1)
    for i in range(3):
        for j in range(3):
            if i != j:
                rows = inside[:, j]
                assert rows.any()
                assert torch.all(mass[:, rows, i] == 0.0), f"queries in region {j} see identity {i}"
    outside = ~inside.any(1)
    assert outside.any() and torch.all(mass[:, outside, :] > 0)
    own_only = inside[:, 0] & ~inside[:, 1] & ~inside[:, 2]
    assert own_only.any() and torch.all(mass[:, own_only, 0] > 0)
