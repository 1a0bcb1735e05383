"""Device memory ComfyUI's manager cannot see (issue 10, deliverable 5): the K_f/V_f caches, Eq. 7 masks, per-step
adapter weights and reference latents IDFusion builds during sampling are released when sampling ends, through
ModelPatcher's ON_CLEANUP callbacks (ModelPatcher.cleanup(), called in a finally by CFGGuider.outer_sample on both
pinned hosts), also when sampling stops with an error."""
import pytest
import torch
import comfy.sample

import random_models
from helpers import random_identity
from idfusion_pack.idfusion.adapter import IDFusionAdapter
from idfusion_pack.idfusion.patch import Entry, Fusion, cached_tensors, install, ours


@pytest.fixture(scope="module")
def model():
    return random_models.build_small_model("SD15", seed=5)


def sample(m, callback=None, steps=3):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    pos = [[torch.randn(1, 8, 64, generator=g), {}]]
    neg = [[torch.zeros(1, 8, 64), {}]]
    with torch.inference_mode():
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 8, 8), seed=0,
                                   callback=callback, disable_pbar=True)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def patched_models(model):
    adapter = IDFusionAdapter.fresh(model, init="random", seed=2)
    a, b = random_identity(model, tokens=(6,), seed=1), random_identity(model, tokens=(4,), seed=2)
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :30], right[:, 34:] = 1, 1
    cached = install(model, Fusion(adapter, [Entry(a, left), Entry(b, right)], mode="cached"))
    per_step = install(model, Fusion(adapter, [Entry(a)], mode="per_step"))
    stacked = install(cached, Fusion(adapter, [Entry(b)], mode="per_step"))  # two Applies on one model
    return {"cached + masks": cached, "per_step": per_step, "stacked": stacked}


@pytest.mark.parametrize("case", ["cached + masks", "per_step", "stacked"])
def test_device_caches_are_released_after_sampling(model, case):
    m = patched_models(model)[case]
    during = []
    first = sample(m, callback=lambda step, x0, x, total: during.append((len(cached_tensors(m)), nbytes(cached_tensors(m)))))
    count, size = max(during)
    assert count > 0 and size > 0, "nothing was cached during sampling: the test would prove nothing"
    assert cached_tensors(m) == [], f"{len(cached_tensors(m))} tensors still held after sampling"
    for p in ours(m):
        assert not p._masks and all(not (f._kv or f._weights or f._refs) for f in p.fusions)
    print(f"{case}: {count} tensors, {size / 1024:.1f} KiB held during sampling, 0 after")
    # released caches are rebuilt on the next run: same pixels
    assert torch.equal(sample(m), first)


def test_released_when_sampling_stops_with_an_error(model):
    m = patched_models(model)["per_step"]

    def stop(step, x0, x, total):
        assert cached_tensors(m)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sample(m, callback=stop)
    assert cached_tensors(m) == []


def test_one_release_callback_per_model_and_clones_keep_it(model):
    from comfy.patcher_extension import CallbacksMP
    m = patched_models(model)["stacked"]
    assert len(m.get_all_callbacks(CallbacksMP.ON_CLEANUP)) == 1
    assert len(m.clone().get_all_callbacks(CallbacksMP.ON_CLEANUP)) == 1
    assert model.get_all_callbacks(CallbacksMP.ON_CLEANUP) == []  # the input model is untouched
