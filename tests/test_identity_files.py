"""Identity files (issue 13, deliverable 2): the compact format 2 stores each reference's latent and thumbnail, not h_f;
h_f is recomputed by one reference pass through the model the identity is applied to. Format 1 files (h_f stored)
still load. Everything runs through the real nodes under torch.inference_mode(), as ComfyUI runs them."""
import os

import comfy.sample
import pytest
import torch

import idfusion_pack
from conftest import small_unet
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.identity import Identity

NODES = idfusion_pack.NODE_CLASS_MAPPINGS
FULL = "h_f (large, format 1)"


def node(name, *args, **kwargs):
    cls = NODES[name]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    return out["result"] if isinstance(out, dict) and "result" in out else out


def faces(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def sample(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 8, 8),
                                   seed=seed, disable_pbar=True)


def apply(model, adapter, identity):
    return node("IDFusionApply", model, adapter, identity, 1.0, 0.0, 1.0, "text only", "cached")[0]


@pytest.fixture(scope="module")
def parts():
    import random_models
    model = small_unet(seed=0, inference=True)
    vae = random_models.build_vae(seed=3)
    adapter = IDFusionAdapter.fresh(model, init="random", seed=5)
    encoded, = node("IDFusionEncodeReference", model, vae, faces(), 0, "ann")
    return model, vae, adapter, encoded


def save_and_load(identity, prefix, *store):
    path = node("IDFusionSaveIdentity", identity, prefix, *store)["ui"]["text"][0]
    loaded, = node("IDFusionLoadIdentity", "identities/" + os.path.basename(path))
    return path, loaded


def test_compact_file_holds_no_h_f_and_gives_the_encoded_identitys_image_bit_for_bit(parts, idfusion_dir):
    model, vae, adapter, encoded = parts
    compact_path, compact = save_and_load(encoded, "ann")
    full_path, full = save_and_load(encoded, "ann_full", FULL)
    assert compact.h_f == [None, None] and all(h is not None for h in full.h_f)
    assert os.path.getsize(compact_path) < os.path.getsize(full_path)
    reference = sample(apply(model, adapter, encoded))
    assert not torch.equal(reference, sample(model)), "the identity must change the image for this test to mean anything"
    for loaded in (compact, full):  # format 2 recomputes h_f, format 1 reads it: both give the encoded identity's image
        assert torch.equal(sample(apply(model, adapter, loaded)), reference)
    recomputed = compact.for_model(model)
    for r in range(2):
        for layer in encoded.layers:
            assert torch.equal(recomputed.h_f[r][layer.name], encoded.h_f[r][layer.name]), (r, layer.name)


def test_h_f_is_computed_once_per_model_and_again_when_its_weights_are_patched(parts, idfusion_dir):
    model, vae, adapter, encoded = parts
    _, compact = save_and_load(encoded, "once")
    first = compact.for_model(model)
    assert compact.for_model(model) is first                  # a cached Load Identity pays the pass once
    patched = model.clone()                                   # a LoRA-like weight patch on a self-attention weight
    key = next(k for k in model.model.state_dict() if k.endswith("attn1.to_q.weight"))
    with torch.inference_mode():
        patched.add_patches({key: (torch.ones_like(model.model.state_dict()[key]) * 0.5,)}, 1.0)
    other = compact.for_model(patched)
    assert other is not first and compact.for_model(patched) is other
    name = encoded.layers[0].name
    assert not torch.equal(other.h_f[0][name], first.h_f[0][name])


def test_a_compact_identity_serves_another_checkpoint_of_its_family(parts, idfusion_dir):
    model, vae, adapter, encoded = parts
    _, compact = save_and_load(encoded, "family")
    other_model = small_unet(seed=1, inference=True)          # same family, other weights
    direct, = node("IDFusionEncodeReference", other_model, vae, faces(), 0, "ann")
    served = compact.for_model(other_model)
    name = encoded.layers[5].name
    assert torch.equal(served.h_f[1][name], direct.h_f[1][name])
    assert not torch.equal(served.h_f[1][name], encoded.h_f[1][name])


def test_merged_compact_and_full_identities_fill_in_only_what_is_missing(parts, idfusion_dir):
    model, vae, adapter, encoded = parts
    _, compact = save_and_load(encoded, "m1")
    _, full = save_and_load(encoded, "m2", FULL)
    merged, = node("IDFusionMergeIdentities", full, compact)
    assert merged.references == 4 and merged.h_f[2] is None and merged.h_f[0] is full.h_f[0]
    done = merged.for_model(model)
    name = encoded.layers[-1].name
    assert done.h_f[0] is full.h_f[0] and torch.equal(done.h_f[3][name], encoded.h_f[1][name])


def test_a_512_px_sd15_reference_is_under_1_MB(tmp_path):
    """Issue 13's size target. The compact file's size depends on the latent (64x64 for 512 px), the SD1.5 text
    context (77x768) and the thumbnail, not on the UNet's width, so the narrow UNet gives the real size."""
    import random_models
    model = small_unet(seed=0, inference=True)
    identity, = node("IDFusionEncodeReference", model, random_models.build_vae(seed=3), faces(1, 512), 0, "big")
    assert identity.latents[0].shape == (1, 4, 64, 64)
    identity.save(str(tmp_path / "compact.safetensors"))
    size = os.path.getsize(tmp_path / "compact.safetensors")
    print(f"compact 512 px SD1.5 identity: {size / 1e6:.3f} MB")
    assert size <= 1_000_000


def test_compact_identity_for_another_latent_format_is_refused_by_name(parts, tmp_path):
    model, vae, adapter, encoded = parts
    odd = Identity(encoded.layers, encoded.family, encoded.encoding, [None], [torch.zeros(1, 16, 8, 8)],
                   encoded.context, None, "odd")
    with pytest.raises(AdapterError, match=r"odd.*16 channels.*takes 4"):
        odd.for_model(model)
    with pytest.raises(AdapterError, match="compact"):
        odd.save(str(tmp_path / "x.safetensors"), with_h_f=True)
