"""Region masks at the Apply nodes (issue 10, defect 8) and the region preview the nodes show in the frontend.

Bad masks are refused when the node runs, naming the input and the fix, never inside KSampler and never silently:
an identity hidden everywhere (a whole-frame mask, complete or nested overlap), more masks than identities, a batch
where one mask is expected, NaN/Inf values. Nodes run under torch.inference_mode(), as ComfyUI runs them."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import random_models
from helpers import random_identity
from idfusion_pack.idfusion.adapter import IDFusionAdapter
from idfusion_pack.idfusion.faces import PALETTE
from idfusion_pack.idfusion.patch import LayerPatch
from idfusion_pack.nodes import apply_nodes, face_nodes, previews

OPTS = (1.0, 0.0, 1.0, "text only", "cached")


@pytest.fixture(scope="module")
def setup():
    model = random_models.build_small_model("SD15", seed=3)
    adapter = IDFusionAdapter.fresh(model, init="random", seed=1)
    ids = [random_identity(model, tokens=(3,), seed=s, name=f"id{s}") for s in range(3)]
    return model, adapter, ids


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    return tmp_path / "temp"


def multi(setup, masks, n=None):
    model, adapter, ids = setup
    n = masks.shape[0] if n is None else n
    kw = {f"identity_{i + 1}": ids[i] for i in range(n)}
    with torch.inference_mode():
        return apply_nodes.IDFusionApplyMultiIdentity().apply(model, adapter, masks, *OPTS, **kw)


def halves(h=32, w=48):
    m = torch.zeros(2, h, w)
    m[0, :, : w // 2] = 1
    m[1, :, w // 2:] = 1
    return m


def test_masks_that_hide_an_identity_everywhere_are_refused(setup):
    m = halves()
    m[1] = 1.0  # mask 2 covers the whole frame: identity 1 is hidden everywhere
    with pytest.raises(ValueError, match=r"mask 1: identity 1 would never be visible, because mask 2 covers the whole "
                                         r"frame.*Make each mask cover only its own person's area"):
        multi(setup, m)
    m = halves()
    m[1] = m[0]  # complete overlap: each identity hides the other inside the only region
    with pytest.raises(ValueError, match=r"mask 1: identity 1 would never be visible, because it lies entirely inside mask 2"):
        multi(setup, m)
    m = torch.zeros(3, 32, 48)
    m[0, 4:12, 4:12] = 1
    m[1, :, :24] = 1  # mask 1 nested inside mask 2
    m[2, :, 30:] = 1
    with pytest.raises(ValueError, match=r"mask 1: identity 1 would never be visible, because it lies entirely inside mask 2"):
        multi(setup, m)
    # soft edges below 0.5 do not count as inside (the layers' own rule), and partial overlap is fine
    m = halves()
    m[1, :, 18:24] = 1  # overlaps mask 1 on 6 columns
    m[0, :, 24:] = 0.4
    patched, = multi(setup, m)
    assert any(isinstance(p, LayerPatch) for p in patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())


def test_more_masks_than_identities_and_mask_batches_are_refused_naming_the_input(setup):
    model, adapter, ids = setup
    m = torch.cat([halves(), halves()[:1]])
    with pytest.raises(ValueError, match=r"masks has 3 mask\(s\) but 2 identities are connected \(identity_1, identity_2\): "
                                         r"connect an identity for each extra mask or drop masks 3-3"):
        multi(setup, m, n=2)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"attn_mask is a batch of 2 masks, but it takes one: connect a single mask, or "
                                             r"use IDFusion Apply Multi-Identity"):
            apply_nodes.IDFusionApply().apply(model, adapter, ids[0], *OPTS, attn_mask=halves())
        with pytest.raises(ValueError, match=r"mask_2 is a batch of 2 masks; Mask Batch takes one mask per input"):
            apply_nodes.IDFusionMaskBatch().batch(mask_1=halves()[:1], mask_2=halves())
        assert apply_nodes.IDFusionMaskBatch().batch(mask_1=halves()[:1], mask_2=halves()[1])[0].shape == (2, 32, 48)


def test_nan_and_inf_masks_are_reported_as_such_not_as_empty(setup):
    model, adapter, ids = setup
    m = halves()
    m[1] = float("nan")
    with pytest.raises(ValueError, match=r"mask 2 is NaN everywhere \(not a number.*fix that node or paint the mask again"):
        multi(setup, m)
    m = halves()
    m[0, :3, :1] = float("nan")
    with pytest.raises(ValueError, match=r"mask 1 is NaN in 3 of 1536 pixels"):
        multi(setup, m)
    m = halves()
    m[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"mask 1 is Inf in 1 of 1536 pixels"):
        multi(setup, m)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"attn_mask is NaN everywhere"):
        apply_nodes.IDFusionApply().apply(model, adapter, ids[0], *OPTS, attn_mask=torch.full((1, 8, 8), float("nan")))


def read_ui_png(ui, temp_dir):
    (entry,) = ui["images"]
    assert entry["type"] == "temp"
    path = os.path.join(str(temp_dir), entry["subfolder"], entry["filename"])
    assert os.path.isfile(path) and not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".part")]
    return np.asarray(Image.open(path).convert("RGB"))


def test_multi_identity_node_shows_each_region_in_its_colour(setup, temp_dir):
    model, adapter, ids = setup
    node = apply_nodes.IDFusionApplyMultiIdentity()
    m = torch.zeros(3, 40, 60)
    m[0, :, :20] = 1
    m[1, :, 16:40] = 1      # overlaps identity 1 on columns 16-19
    m[2, :20, 50:] = 0.3    # faint: the layers keep its best-covered pixels, and so does the preview
    m[2, 30:, 50:] = 0.2
    fn = getattr(node, node.FUNCTION)
    with torch.inference_mode():
        out = fn(model, adapter, m, *OPTS, identity_1=ids[0], identity_2=ids[1], identity_3=ids[2])
    (patched,) = out["result"]
    assert out["ui"]["idfusion_regions"] == [{"label": f"identity {i + 1}: id{i}", "color": "#%02x%02x%02x" % PALETTE[i]}
                                             for i in range(3)]
    assert patched is not model and "patches_replace" in patched.model_options["transformer_options"]
    png = read_ui_png(out["ui"], temp_dir).astype(int)
    assert png.shape == (40, 60, 3)
    assert (png[:, :16] == PALETTE[0]).all() and (png[:, 20:40] == PALETTE[1]).all()
    mixed = np.round((np.array(PALETTE[0]) + np.array(PALETTE[1])) / 2 - 1e-9)
    assert (np.abs(png[:, 16:20] - mixed) <= 1).all()
    assert (png[:20, 50:] == PALETTE[2]).all() and (png[20:, 50:] == previews.OUTSIDE).all()
    assert (png[:, 40:50] == previews.OUTSIDE).all()


def test_large_masks_are_previewed_downscaled(setup, temp_dir):
    model, adapter, ids = setup
    node = apply_nodes.IDFusionApplyMultiIdentity()
    m = halves(1024, 2048)
    with torch.inference_mode():
        out = getattr(node, node.FUNCTION)(model, adapter, m, *OPTS, identity_1=ids[0], identity_2=ids[1])
    png = read_ui_png(out["ui"], temp_dir)
    assert png.shape == (256, 512, 3) and (png[:, :250] == PALETTE[0]).all()


def test_face_masks_node_shows_its_preview(temp_dir):
    node = face_nodes.IDFusionFaceMasks()
    image = torch.full((1, 64, 96, 3), 0.5)
    user = torch.zeros(2, 64, 96)
    user[0, :, :40] = 1
    user[1, :, 56:] = 1
    with torch.inference_mode():
        out = getattr(node, node.FUNCTION)(image, 2, "left to right", 0.0, 0, user_masks=user)
    masks, preview = out["result"]
    assert [r["label"] for r in out["ui"]["idfusion_regions"]] == ["identity 1", "identity 2"]
    assert masks.shape == (2, 64, 96) and preview.shape == (1, 64, 96, 3)
    png = read_ui_png(out["ui"], temp_dir)
    assert np.array_equal(png, (preview[0].numpy() * 255 + 0.5).astype(np.uint8))
    assert png[10, 10, 0] > png[10, 10, 2] and png[10, 80, 2] > png[10, 80, 0]  # identity 1 red, identity 2 blue-ish
