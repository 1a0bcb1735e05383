"""The patched attn2 of a real ComfyUI SD1.5 UNet matches a float64 implementation of Eqs. 1-7."""
import numpy as np
import pytest
import torch

from helpers import attn2_recorder, fused_attention_reference, random_identity
from random_models import sampler_transformer_options
from idfusion_pack.idfusion.adapter import IDFusionAdapter, attn2_modules
from idfusion_pack.idfusion.patch import Entry, Fusion, install


def run_capturing(model_patcher, x, context, cond_or_uncond):
    """One UNet evaluation with the patched model's transformer_options (as ComfyUI's sampler builds them),
    capturing every attn2's query input and output."""
    seen, patches = attn2_recorder()
    to = sampler_transformer_options(model_patcher, cond_or_uncond)
    to["patches"] = patches
    sigma = torch.full((x.shape[0],), 2.0)
    with torch.no_grad():
        model_patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)
    return seen


CASES = {
    "1 reference": dict(identities=[(1, None)], weight=1.0),
    "3 references": dict(identities=[(3, None)], weight=0.7),
    "3 identities with masks": dict(identities=[(1, "left"), (2, "right"), (1, "top")], weight=1.0),
}


def region(kind, H=72, W=56):
    m = torch.zeros(H, W)
    if kind == "left":
        m[:, : W // 2] = 1
    elif kind == "right":
        m[:, W // 2 + 4:] = 1
    elif kind == "top":
        m[: H // 3, W // 4: 3 * W // 4] = 1
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_patched_attention_matches_float64_equations(sd15, case):
    spec = CASES[case]
    adapter = IDFusionAdapter.fresh(sd15, init="random", seed=3)
    ids = [random_identity(sd15, refs=r, tokens=(5 + 2 * n,), seed=10 + n, name=f"id{n}") for n, (r, _) in enumerate(spec["identities"])]
    regions = [region(kind) if kind else None for _, kind in spec["identities"]]
    fusion_ = Fusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)], weight=spec["weight"])
    patched = install(sd15, fusion_)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 9, 7, generator=g)           # odd latent: 9x7 -> 5x4 -> 3x2 -> 2x1 token grids
    context = torch.randn(4, 77, 768, generator=g)
    cond_or_uncond = [1, 0]                              # rows 0-1 uncond, rows 2-3 cond, as ComfyUI batches CFG
    seen = run_capturing(patched, x, context, cond_or_uncond)

    modules = attn2_modules(sd15.model.diffusion_model)
    assert set(seen) == {l.key for l in adapter.layers}
    cond_rows = [False, False, True, True]
    worst = 0.0
    for layer in adapter.layers:
        s = seen[layer.key]
        ref = fused_attention_reference(s["n"], context, modules[layer.key][1], adapter, layer, ids, regions,
                                        spec["weight"], cond_rows, s["hw"])
        got = s["out"].double().numpy()
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        worst = max(worst, rel)
        assert rel < 1e-5, f"layer {layer.key}: max relative error {rel:.2e}"
    # the identity must actually change the cond rows (else the comparison above proves nothing)
    plain = run_capturing(sd15, x, context, cond_or_uncond)
    first = adapter.layers[0].key
    assert not torch.allclose(plain[first]["out"][2:], seen[first]["out"][2:])
    assert torch.allclose(plain[first]["out"][:2], seen[first]["out"][:2], rtol=0, atol=1e-5)
