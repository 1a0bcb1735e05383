"""Reference token budget (issue 13, deliverable 3): with reference_tokens "pooled", each reference's h_f is averaged
2x2 at the layers with one token per reference latent position (the highest resolution), and only there.

References are encoded by the real reference pass (run_reference_pass) of a narrow SD1.5-layout UNet, so the layers'
token counts are the model's own. Token counts reaching the attention are read by another pack's attn2 replace chained
under IDFusion: it receives K' = [K_c; K_f]."""
import math

import numpy as np
import pytest
import torch

import random_models
from random_models import sampler_transformer_options
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.identity import Identity, reference_sigma, run_reference_pass, text_condition
from idfusion_pack.idfusion.patch import Entry, Fusion, install
from idfusion_pack.nodes import apply_nodes

N_TEXT = 77


@pytest.fixture(scope="module")
def small():
    model = random_models.build_small_model("SD15", seed=11)
    return model, IDFusionAdapter.fresh(model, init="random", seed=3)


def encode(model, hw, refs=1, seed=0, name="ref"):
    """An Identity from the real reference pass on random latents of size hw (what Encode Reference does, minus the VAE)."""
    g = torch.Generator().manual_seed(seed)
    context, y, _ = text_condition(model)
    from idfusion_pack.idfusion.adapter import find_layers, model_family
    layers = find_layers(model.model.diffusion_model)
    h_f, lats = [], []
    for _ in range(refs):
        x = torch.randn(1, 4, *hw, generator=g)
        rec = run_reference_pass(model.model, torch.device("cpu"), x, reference_sigma(model, 0), context, y)
        h_f.append({l.name: rec[l.key][0].float() for l in layers})
        lats.append(x)
    return Identity(layers, model_family(model), {"mode": "cached", "timestep": 0, "text": "zeros"}, h_f, lats, context, y, name)


class KeyCounter:
    """Another pack's attn2 replace, installed before IDFusion: plain attention over the keys it is handed,
    recording how many keys each layer received."""

    def __init__(self):
        self.keys = {}

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention
        self.keys[(extra["block"][0], extra["block"][1], extra["block_index"])] = k.shape[1]
        return optimized_attention(q, k, v, extra["n_heads"])


def keys_per_layer(model, adapter, make_patched, latent_hw=(8, 8)):
    """Number of K_f tokens each layer attends to in one CFG-batch forward of make_patched(base)."""
    counter = KeyCounter()
    base = model.clone()
    for l in adapter.layers:
        base.set_model_attn2_replace(counter, *l.key)
    patched = make_patched(base)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *latent_hw, generator=g)
    ctx = torch.randn(2, N_TEXT, model.model.model_config.unet_config["context_dim"], generator=g)
    with torch.no_grad():
        model.model.apply_model(x, torch.full((2,), 1.0), c_crossattn=ctx,
                                transformer_options=sampler_transformer_options(patched, [0, 0]))
    return {k: n - N_TEXT for k, n in counter.keys.items()}


def expected_tokens(identity, layer, r=0):
    H, W = identity.latents[r].shape[-2:]
    n = identity.h_f[r][layer.name].shape[0]
    return math.ceil(H / 2) * math.ceil(W / 2) if n == H * W else n


def pool_reference(h_f: np.ndarray, H: int, W: int) -> np.ndarray:
    """float64 2x2 average over the cells that exist (odd sides: the last row/column averages 2 or 1 cells)."""
    grid = h_f.reshape(H, W, -1)
    out = [grid[i:i + 2, j:j + 2].reshape(-1, grid.shape[-1]).mean(0) for i in range(0, H, 2) for j in range(0, W, 2)]
    return np.stack(out)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)], ids=["even", "odd"])
def test_pooled_token_counts_at_the_top_layers_only(small, hw):
    model, adapter = small
    ident = encode(model, hw)
    H, W = hw
    top = [l for l in adapter.layers if ident.h_f[0][l.name].shape[0] == H * W]
    lower = [l for l in adapter.layers if l not in top]
    assert top and lower  # SD1.5 layout: the first input and last output level are at the latent's resolution
    counts = keys_per_layer(model, adapter, lambda b: install(b, Fusion(adapter, [Entry(ident)], reference_tokens="pooled")))
    full = keys_per_layer(model, adapter, lambda b: install(b, Fusion(adapter, [Entry(ident)])))
    for l in top:
        assert counts[l.key] == math.ceil(H / 2) * math.ceil(W / 2), l.key
        assert full[l.key] == H * W
    for l in lower:
        assert counts[l.key] == full[l.key] == ident.h_f[0][l.name].shape[0], l.key


def test_pooled_k_f_v_f_match_float64_pool_then_project(small):
    model, adapter = small
    ident = encode(model, (7, 9), refs=2, seed=4)  # several references: each pooled on its own grid, then concatenated
    weight = 0.7
    f = Fusion(adapter, [Entry(ident)], weight=weight, reference_tokens="pooled")
    for l in adapter.layers:
        (K_f, V_f), = f.kv(l, torch.device("cpu"), torch.float32, None)
        Wk, Wv = (w.detach().double().numpy() for w in adapter.weights(l))
        ks, vs = [], []
        for r in range(ident.references):
            h = ident.h_f[r][l.name].double().numpy()
            H, W = ident.latents[r].shape[-2:]
            if h.shape[0] == H * W:
                h = pool_reference(h, H, W)
            ks.append(h @ Wk.T)
            vs.append(weight * (h @ Wv.T))
        np.testing.assert_allclose(K_f.double().numpy(), np.concatenate(ks), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(V_f.double().numpy(), np.concatenate(vs), rtol=1e-5, atol=1e-5)
        assert K_f.shape[0] == sum(expected_tokens(ident, l, r) for r in range(ident.references))


def test_per_step_mode_pools_the_reencoded_h_f(small):
    model, adapter = small
    ident = encode(model, (7, 9), seed=6)
    counts = keys_per_layer(model, adapter, lambda b: install(
        b, Fusion(adapter, [Entry(ident)], mode="per_step", reference_tokens="pooled")))
    full = keys_per_layer(model, adapter, lambda b: install(b, Fusion(adapter, [Entry(ident)], mode="per_step")))
    assert set(counts) == {l.key for l in adapter.layers}
    pooled_somewhere = False
    for l in adapter.layers:
        assert counts[l.key] == expected_tokens(ident, l), l.key
        pooled_somewhere |= counts[l.key] < full[l.key]
    assert pooled_somewhere


def test_apply_nodes_take_the_option_and_masks_follow_the_pooled_counts(small):
    model, adapter = small
    a, b = encode(model, (8, 8), seed=1, name="a"), encode(model, (5, 7), seed=2, name="b")
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    with torch.inference_mode():
        single = apply_nodes.IDFusionApply().apply(model, adapter, a, 1.0, 0.0, 1.0, "text only", "cached",
                                                   reference_tokens=apply_nodes.POOLED)[0]
        multi = apply_nodes.IDFusionApplyMultiIdentity().apply(
            model, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached", reference_tokens=apply_nodes.POOLED,
            identity_1=a, identity_2=b)[0]
        default = apply_nodes.IDFusionApply().apply(model, adapter, a, 1.0, 0.0, 1.0, "text only", "cached")[0]
        for patched, want in ((single, "pooled"), (multi, "pooled"), (default, "all")):
            patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][adapter.layers[0].key]
            assert patch.fusions[0].reference_tokens == want
        # the Eq. 7 mask is built from the pooled token counts: a forward with two differently sized references runs
        x = torch.randn(2, 4, 8, 8)
        ctx = torch.randn(2, N_TEXT, model.model.model_config.unet_config["context_dim"])
        out = model.model.apply_model(x, torch.full((2,), 1.0), c_crossattn=ctx,
                                      transformer_options=sampler_transformer_options(multi, [0, 1]))
        assert torch.isfinite(out).all()
        with pytest.raises(ValueError, match="reference_tokens"):
            apply_nodes.IDFusionApply().apply(model, adapter, a, 1.0, 0.0, 1.0, "text only", "cached", reference_tokens="half")
    with pytest.raises(AdapterError, match="reference_tokens"):
        Fusion(adapter, [Entry(a)], reference_tokens="2x2")


def test_sdxl_layout_pools_its_highest_resolution_attention_at_half_the_latent():
    """SDXL has no attention at the latent's own resolution: its highest-resolution attn2 layers (the narrowest, 640
    channels at full width) sit at half of it. Pooling happens there, on that grid, and nowhere else."""
    model = random_models.build_small_model("SDXL", seed=2, real_depth=True)
    adapter = IDFusionAdapter.fresh(model, init="random", seed=3)
    ident = encode(model, (16, 14))
    narrowest = min(l.channels for l in adapter.layers)
    top = [l for l in adapter.layers if l.channels == narrowest]
    assert len(adapter.layers) == 70 and len(top) == 10
    assert all(ident.h_f[0][l.name].shape[0] == 8 * 7 for l in top)      # latent/2: no attention at 16x14
    f = Fusion(adapter, [Entry(ident)], reference_tokens="pooled")
    for l in adapter.layers:
        (K_f, _), = f.kv(l, torch.device("cpu"), torch.float32, None)
        assert K_f.shape[0] == (4 * 4 if l in top else ident.h_f[0][l.name].shape[0]), l.key
