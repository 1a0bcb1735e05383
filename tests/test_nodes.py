"""Node behaviour through ComfyUI's real sampler: weight 0, untouched input model, schedule, CFG branch,
per-step mode, encoder, files and every error the issue names."""
import os
import pickle

import pytest
import torch
import comfy.sample
from safetensors.torch import save_file

import idfusion_pack
from helpers import random_identity
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter

NODES = idfusion_pack.NODE_CLASS_MAPPINGS


def node(name):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)


def sample(model, batch=1, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, torch.zeros(batch, 4, 8, 8), seed=seed,
                               disable_pbar=True)


@pytest.fixture(scope="module")
def setup(sd15):
    adapter = IDFusionAdapter.fresh(sd15, init="random", seed=5)
    identity = random_identity(sd15, refs=2, tokens=(16,))
    plain = sample(sd15)
    return adapter, identity, plain


def apply(model, adapter, identity, weight=1.0, start=0.0, end=1.0, uncond="text only", mode="cached", **kw):
    return node("IDFusionApply")(model, adapter, identity, weight, start, end, uncond, mode, **kw)[0]


def test_identity_changes_the_image_and_input_model_stays_unpatched(sd15, setup):
    adapter, identity, plain = setup
    patched = apply(sd15, adapter, identity)
    out = sample(patched)
    assert not torch.allclose(out, plain)
    # the unpatched branch of the same graph gives the same pixels as without the pack
    assert torch.equal(sample(sd15), plain)
    assert "patches_replace" not in sd15.model_options.get("transformer_options", {})


def test_weight_zero_is_bit_identical_to_the_plain_model(sd15, setup):
    adapter, identity, plain = setup
    assert torch.equal(sample(apply(sd15, adapter, identity, weight=0.0)), plain)


def test_outside_start_end_window_the_model_is_unchanged(sd15, setup):
    adapter, identity, plain = setup
    # 2 "normal" steps evaluate the model at sigma_max and sigma_min; a window in the middle misses both
    assert torch.equal(sample(apply(sd15, adapter, identity, start=0.4, end=0.6)), plain)
    assert not torch.equal(sample(apply(sd15, adapter, identity, start=0.0, end=0.5)), plain)


def test_uncond_branch_choice_matters_and_batches_above_one_work(sd15, setup):
    adapter, identity, _ = setup
    text_only = sample(apply(sd15, adapter, identity, uncond="text only"), batch=2)
    both = sample(apply(sd15, adapter, identity, uncond="identity too"), batch=2)
    assert text_only.shape == (2, 4, 8, 8) and torch.isfinite(text_only).all()
    assert not torch.allclose(text_only, both)


def test_per_step_mode_reencodes_and_is_deterministic(sd15, setup):
    adapter, identity, _ = setup
    cached = sample(apply(sd15, adapter, identity, mode="cached"), steps=1)
    a = sample(apply(sd15, adapter, identity, mode="per_step"), steps=1)
    b = sample(apply(sd15, adapter, identity, mode="per_step"), steps=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, cached)


def test_encoder_records_h_f_per_layer_and_reference(sd15):
    import random_models
    vae = random_models.build_vae(seed=3)
    images = torch.rand(3, 64, 48, 3)
    out = node("IDFusionEncodeReference")(sd15, vae, images, 0, "ann")
    identity, = out["result"]
    assert identity.references == 3 and len(identity.layers) == 16
    # 64x48 image -> 8x6 latent -> 48 tokens at the first level, 4x3 then 2x2, 1x1 in the middle
    tokens = {l.key: identity.h_f[0][l.name].shape for l in identity.layers}
    assert tokens[("input", 1, 0)] == (48, 320)
    assert tokens[("input", 4, 0)] == (12, 640)
    assert tokens[("middle", 0, 0)] == (1, 1280)
    assert not torch.equal(identity.h_f[0][identity.layers[0].name], identity.h_f[1][identity.layers[0].name])
    merged, = node("IDFusionMergeIdentities")(identity, identity)
    assert merged.references == 6


def test_reference_thumbnails_are_shown_saved_loaded_and_merged(sd15, idfusion_dir, tmp_path, monkeypatch):
    """Encode and Load return PreviewImage-style temp PNGs of each reference (longest side 64 px); the identity file
    keeps them as uint8 ref<r>.thumbnail; Merge keeps both sets; a file written without them still loads."""
    import folder_paths
    import numpy as np
    from PIL import Image
    import random_models
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    images = torch.zeros(2, 96, 160, 3)
    images[0, :, :80, 0] = 1.0   # left half red
    images[1, :48, :, 2] = 1.0   # top half blue
    with torch.inference_mode():
        out = node("IDFusionEncodeReference")(sd15, random_models.build_vae(seed=3), images, 0, "two refs")
    identity, = out["result"]
    assert [t.shape for t in identity.thumbnails] == [(38, 64, 3), (38, 64, 3)]
    assert all(t.dtype == torch.uint8 for t in identity.thumbnails)
    shown = out["ui"]["images"]
    assert len(shown) == 2 and all(i["type"] == "temp" and i["subfolder"] == "" for i in shown)
    with Image.open(tmp_path / "temp" / shown[0]["filename"]) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape == (38, 64, 3) and px[:, :30, 0].min() > 200 and px[:, 34:, 0].max() < 30
    path = node("IDFusionSaveIdentity")(identity, "thumbs")["ui"]["text"][0]
    loaded = node("IDFusionLoadIdentity")("identities/" + os.path.basename(path))
    assert torch.equal(loaded["result"][0].thumbnails[1], identity.thumbnails[1])
    assert len(loaded["ui"]["images"]) == 2
    old = random_identity(sd15, refs=1)  # no thumbnails, like files written before they existed
    merged, = node("IDFusionMergeIdentities")(identity, old)
    assert merged.references == 3 and merged.thumbnail(1) is identity.thumbnails[1] and merged.thumbnail(2) is None
    both, = node("IDFusionMergeIdentities")(identity, identity)
    assert len(both.thumbnails) == 4


def test_identity_name_is_checked(sd15):
    import random_models
    for bad in ("ann\n", "../x", "a" * 101, ""):
        with pytest.raises(ValueError, match="name"):
            node("IDFusionEncodeReference")(sd15, random_models.build_vae(seed=3), torch.rand(1, 64, 64, 3), 0, bad)


def test_multi_identity_node_checks_masks(sd15, setup):
    adapter, identity, plain = setup
    multi = NODES["IDFusionApplyMultiIdentity"]().apply  # the node itself returns {"ui": region preview, "result": ...}
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    with pytest.raises(ValueError, match="masks has 2 mask.*3 identities"):
        multi(sd15, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached", identity_1=identity, identity_2=identity, identity_3=identity)
    empty = masks.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="mask 2 is empty"):
        multi(sd15, adapter, empty, 1.0, 0.0, 1.0, "text only", "cached", identity_1=identity, identity_2=identity)
    out = sample(multi(sd15, adapter, masks, 1.0, 0.0, 1.0, "text only", "cached", identity_1=identity, identity_2=identity)[0])
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    batch, = node("IDFusionMaskBatch")(mask_1=masks[:1], mask_2=torch.ones(1, 32, 32))
    assert batch.shape == (2, 64, 64)


def test_adapter_for_another_family_is_refused_with_both_layer_counts(sd15, sdxl_structure):
    adapter = IDFusionAdapter.fresh(sd15, init="zeros")
    identity = random_identity(sd15)
    with pytest.raises(AdapterError, match=r"made for SD15 \(16 layers\) but the model is SDXL \(70 layers\)"):
        node("IDFusionApply")(sdxl_structure, adapter, identity, 1.0, 0.0, 1.0, "text only", "cached")


def test_adapter_file_roundtrip_and_loader_lists_only_adapters(sd15, idfusion_dir):
    adapter = IDFusionAdapter.fresh(sd15, init="random", seed=9)
    adapter.save(str(idfusion_dir / "mine.safetensors"))
    assert [p for p in os.listdir(idfusion_dir) if p.startswith(".tmp")] == []
    (idfusion_dir / "identities").mkdir()
    random_identity(sd15).save(str(idfusion_dir / "identities" / "ann_00001.safetensors"))
    inputs = NODES["IDFusionAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][0]
    assert inputs == ["mine.safetensors"]
    loaded, = node("IDFusionAdapterLoader")("mine.safetensors")
    assert loaded.layers == adapter.layers and loaded.family == "SD15"
    for a, b in zip(adapter.state_tensors().values(), loaded.state_tensors().values()):
        assert torch.equal(a, b)


def test_identity_save_load_roundtrip_stays_in_models_folder(sd15, idfusion_dir):
    identity = random_identity(sd15, refs=2)
    out = node("IDFusionSaveIdentity")(identity, "ann", "h_f (large, format 1)")
    path = out["ui"]["text"][0]
    assert os.path.dirname(path) == str(idfusion_dir / "identities")
    names = NODES["IDFusionLoadIdentity"].INPUT_TYPES()["required"]["identity_name"][0]
    assert names == ["identities/ann_00001.safetensors"]
    loaded, = node("IDFusionLoadIdentity")(names[0])["result"]
    assert loaded.references == 2
    assert torch.equal(loaded.h_f[1][loaded.layers[3].name], identity.h_f[1][identity.layers[3].name])
    compact = node("IDFusionSaveIdentity")(identity, "ann")["ui"]["text"][0]  # the default: format 2, no h_f
    loaded, = node("IDFusionLoadIdentity")("identities/" + os.path.basename(compact))["result"]
    assert loaded.references == 2 and loaded.h_f == [None, None] and torch.equal(loaded.context, identity.context)
    assert os.path.getsize(compact) < os.path.getsize(path)
    for bad in ("../escape", "a/b", "/abs", "ok\n", "a.b", "x" * 101, "\x1b[31m"):
        with pytest.raises(ValueError, match="filename_prefix"):
            node("IDFusionSaveIdentity")(identity, bad)


def test_wrong_shaped_adapter_file_is_refused(sd15, idfusion_dir):
    adapter = IDFusionAdapter.fresh(sd15, init="zeros")
    tensors = adapter.state_tensors()
    first = next(iter(tensors))
    tensors[first] = torch.zeros(7, 7)
    save_file(tensors, str(idfusion_dir / "bad.safetensors"), metadata=adapter.metadata())
    with pytest.raises(AdapterError, match=r"bad.safetensors.*shape \(7, 7\)"):
        node("IDFusionAdapterLoader")("bad.safetensors")


def test_non_safetensors_adapter_is_refused_without_unpickling(idfusion_dir, tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(idfusion_dir / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(AdapterError, match="not a .safetensors file"):
        node("IDFusionAdapterLoader")("evil.pt")
    assert not marker.exists()


def test_safetensors_without_idfusion_metadata_is_refused(idfusion_dir):
    save_file({"w": torch.zeros(2)}, str(idfusion_dir / "other.safetensors"))
    with pytest.raises(AdapterError, match="not an IDFusion adapter file"):
        node("IDFusionAdapterLoader")("other.safetensors")
    (idfusion_dir / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="could not be read as safetensors"):
        node("IDFusionAdapterLoader")("junk.safetensors")


def test_missing_adapter_names_the_folder(idfusion_dir):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*idfusion"):
        node("IDFusionAdapterLoader")("nope.safetensors")


def test_new_adapter_inits(sd15):
    zeros, = node("IDFusionNewAdapter")(sd15, "zeros", 0)
    assert all(float(p.detach().abs().sum()) == 0 for p in zeros.parameters())
    attn1, = node("IDFusionNewAdapter")(sd15, "attn1", 0)
    blk = sd15.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    assert torch.equal(attn1.to_k_f["input_1_0"].weight, blk.attn1.to_k.weight)
    assert torch.equal(attn1.to_v_f["input_1_0"].weight, blk.attn1.to_v.weight)
    r1, = node("IDFusionNewAdapter")(sd15, "random", 1)
    r2, = node("IDFusionNewAdapter")(sd15, "random", 1)
    assert torch.equal(r1.to_k_f["middle_0_0"].weight, r2.to_k_f["middle_0_0"].weight)


def test_load_adapter_lists_adapters_only_not_identities_or_training_state(idfusion_dir):
    from idfusion_pack.nodes.common import adapter_files, identity_files
    for rel in ("mine.safetensors", "identities/me_00001.safetensors", "training/mine.train-state.safetensors"):
        (idfusion_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (idfusion_dir / rel).write_bytes(b"")
    assert adapter_files() == ["mine.safetensors"]
    assert identity_files() == ["identities/me_00001.safetensors"]
