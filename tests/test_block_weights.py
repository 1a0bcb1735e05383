"""Per-block weights (issue 13, deliverable 4): Apply's block_weights, groups ('input:1, middle:0.5, output:1') and
attn2 layer indices as in IPAdapter's layer_weights ('0:1, 5:0'), multiplying weight.

A block weight of 0 leaves that block's attn2 output bit-identical to the unpatched model. Outputs are captured on
the real model with ComfyUI's attn2_output_patch (and its input with attn2_patch), on both the patched and the
unpatched model, in the same forward setup. Narrow UNets with the families' block layouts."""
import numpy as np
import pytest
import torch

import random_models
from helpers import random_identity
from random_models import sampler_transformer_options
from idfusion_pack.idfusion.adapter import IDFusionAdapter, attn2_modules, find_layers
from idfusion_pack.idfusion.patch import Entry, Fusion, ours
from idfusion_pack.nodes import apply_nodes


@pytest.fixture(scope="module")
def small():
    model = random_models.build_small_model("SD15", seed=13)
    adapter = IDFusionAdapter.fresh(model, init="random", seed=4)
    return model, adapter, random_identity(model, refs=2, tokens=(5, 9), seed=3)


class Recorder:
    """attn2_patch + attn2_output_patch: per layer, what attn2 received (query input, context) and its output."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def __deepcopy__(self, memo):
        return self

    @staticmethod
    def key(extra):
        return (extra["block"][0], extra["block"][1], extra.get("block_index", 0))

    def before(self, n, context, value, extra):
        self.inputs[self.key(extra)] = (n.clone(), context.clone())
        return n, context, value

    def after(self, n, extra):
        self.outputs[self.key(extra)] = n.clone()
        return n


def run(model_patcher, seed=0):
    """One CFG-batch forward (both rows cond, so the identity acts on both) with a recorder; returns it."""
    rec = Recorder()
    m = model_patcher.clone()
    m.set_model_attn2_patch(rec.before)
    m.set_model_attn2_output_patch(rec.after)
    cfg = m.model.model_config.unet_config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    with torch.no_grad():
        m.model.apply_model(x, torch.full((2,), 1.0), c_crossattn=ctx, transformer_options=sampler_transformer_options(m, [0, 0]))
    return rec


def apply(model, adapter, identity, block_weights, weight=1.0, mode="cached"):
    with torch.inference_mode():  # as ComfyUI runs nodes
        return apply_nodes.IDFusionApply().apply(model, adapter, identity, weight, 0.0, 1.0, "text only", mode,
                                                 block_weights=block_weights)[0]


@pytest.mark.parametrize("mode", ["cached", "per_step"])
def test_input_block_zero_is_bit_identical_there_and_other_blocks_still_fuse(small, mode):
    model, adapter, ident = small
    plain = run(model)
    patched = run(apply(model, adapter, ident, "input:0, middle:1, output:1", mode=mode))
    for l in adapter.layers:
        same = torch.equal(patched.outputs[l.key], plain.outputs[l.key])
        assert same == (l.key[0] == "input"), (l.key, same)


def test_layer_index_zero_switches_off_that_layer_only(small):
    model, adapter, ident = small
    plain = run(model)
    patched = run(apply(model, adapter, ident, "0:0"))
    first = adapter.layers[0]
    assert torch.equal(patched.outputs[first.key], plain.outputs[first.key])
    assert all(not torch.equal(patched.outputs[l.key], plain.outputs[l.key]) for l in adapter.layers[1:])


@pytest.mark.parametrize("spec,off", [("middle:0", lambda i, l: l.key[0] == "middle"),
                                       ("output:1, 9:0, 12:0", lambda i, l: i in (9, 12)),
                                       ("input:0, 3:1, output:0", lambda i, l: l.key[0] != "middle" and i != 3)])
def test_zero_layers_anywhere_compute_exactly_the_unpatched_attn2(small, spec, off):
    """Deeper layers see different inputs once an earlier layer fuses, so here every layer's output is compared with
    the unpatched attn2 module run on the very input and context that layer received in the patched forward."""
    model, adapter, ident = small
    rec = run(apply(model, adapter, ident, spec))
    modules = {k: m for k, (_, m) in attn2_modules(model.model.diffusion_model).items()}
    for i, l in enumerate(adapter.layers):
        n, ctx = rec.inputs[l.key]
        with torch.no_grad():
            plain = modules[l.key](n, context=ctx)
        assert torch.equal(rec.outputs[l.key], plain) == off(i, l), (i, l.key)


def test_weights_scale_v_f_per_layer_and_key_the_cache(small):
    model, adapter, ident = small
    layer_weights = apply_nodes.parse_block_weights("input:0.5, output:2, 15:0.25", adapter.layers)
    f = Fusion(adapter, [Entry(ident)], weight=0.8, layer_weights=layer_weights)
    cpu = torch.device("cpu")
    for i, l in enumerate(adapter.layers):
        factor = 0.25 if i == 15 else {"input": 0.5, "middle": 1.0, "output": 2.0}[l.key[0]]
        assert f.weight_at(l) == pytest.approx(0.8 * factor)
        (K_f, V_f), = f.kv(l, cpu, torch.float32, None)
        Wk, Wv = (w.detach().double().numpy() for w in adapter.weights(l))
        h = np.concatenate([r[l.name].double().numpy() for r in ident.h_f])
        np.testing.assert_allclose(K_f.double().numpy(), h @ Wk.T, rtol=1e-5, atol=1e-5)   # keys are not weighted
        np.testing.assert_allclose(V_f.double().numpy(), 0.8 * factor * (h @ Wv.T), rtol=1e-5, atol=1e-5)
    # the cache holds one entry per layer, keyed by that layer's own weight
    assert {(k[0], k[3]) for k in f._kv} == {(l.name, f.weight_at(l)) for l in adapter.layers}


def test_all_zero_returns_an_unpatched_clone(small):
    model, adapter, ident = small
    for spec, weight in (("input:0, middle:0, output:0", 1.0), (", ".join(f"{i}:0" for i in range(16)), 1.0),
                         ("input:1", 0.0)):
        out = apply(model, adapter, ident, spec, weight=weight)
        assert out is not model and not ours(out), spec
        assert not any(k.startswith("idfusion") for k in str(out.wrappers)), spec
    assert torch.equal(run(apply(model, adapter, ident, "input:0, middle:0, output:0")).outputs[adapter.layers[-1].key],
                       run(model).outputs[adapter.layers[-1].key])


def test_empty_default_and_ones_equal_the_plain_apply(small):
    model, adapter, ident = small
    ref = run(apply(model, adapter, ident, ""))
    for spec in ("input:1, middle:1, output:1", "0:1, 15:1"):
        got = run(apply(model, adapter, ident, spec))
        assert all(torch.equal(got.outputs[k], ref.outputs[k]) for k in ref.outputs), spec
    with torch.inference_mode():  # block_weights is optional: the 8 positional arguments still work
        apply_nodes.IDFusionApply().apply(model, adapter, ident, 1.0, 0.0, 1.0, "text only", "cached")


def test_multi_identity_takes_block_weights(small):
    model, adapter, ident = small
    other = random_identity(model, tokens=(4,), seed=8, name="b")
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    with torch.inference_mode():
        patched = apply_nodes.IDFusionApplyMultiIdentity().apply(model, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached",
                                                                 block_weights="input:0", identity_1=ident, identity_2=other)[0]
    plain, rec = run(model), run(patched)
    for l in adapter.layers:
        assert torch.equal(rec.outputs[l.key], plain.outputs[l.key]) == (l.key[0] == "input"), l.key


@pytest.mark.parametrize("spec,message", [
    ("head:1", "unknown group 'head'"),
    ("16:0", "layer index 16 .* out of range: this model has 16 attn2 layers, indices 0-15"),
    ("-1:0", "layer index -1 .* out of range"),
    ("input:half", "'half' in 'input:half' is not a number"),
    ("output:-0.5", "finite number >= 0"),
    ("middle:inf", "finite number >= 0"),
    ("input:1, input:0", "group 'input' is given twice"),
    ("3:1, 3:0.5", "layer 3 is given twice"),
    ("input", "'input' is not 'name:value'"),
])
def test_bad_block_weights_are_refused_before_anything_is_installed(small, spec, message):
    model, adapter, ident = small
    before = len(model.model_options.get("transformer_options", {}))
    with pytest.raises(ValueError, match=message) as err:
        apply(model, adapter, ident, spec)
    assert str(err.value).startswith("block_weights:")
    assert len(model.model_options.get("transformer_options", {})) == before and not ours(model)


def test_layer_count_in_errors_is_read_off_the_model(sdxl_structure):
    layers = find_layers(sdxl_structure.model.diffusion_model)
    with pytest.raises(ValueError, match="this model has 70 attn2 layers, indices 0-69"):
        apply_nodes.parse_block_weights("70:1", layers)
    got = apply_nodes.parse_block_weights("input:0, 69:0.5", layers)
    assert got[layers[69].name] == 0.5 and all(got[l.name] == 0 for l in layers if l.key[0] == "input")
    assert len(got) == sum(l.key[0] == "input" for l in layers) + 1
