"""The synthetic identity domain behind issue 3's report (benchmarks/synthetic): identities are told apart by
their attributes, the codec is exact, the tiny base model is a ComfyUI UNet this pack can patch, and the
trainer takes one step on it. The report itself is `make synthetic` (about 15 minutes); this only guards
its machinery."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "synthetic"))
import domain as D  # noqa: E402

from idfusion_pack.idfusion.adapter import IDFusionAdapter, find_layers  # noqa: E402


def test_identities_differ_and_captions_never_name_them():
    ids = D.identities(32, seed=0)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert sum(a[k] != b[k] for k in D.IDENTITY_ATTRS) >= 2
    words = set(D.WordEncoder().vocab)
    assert not words & {v for vals in D.IDENTITY_ATTRS.values() for v in vals}
    with pytest.raises(ValueError, match="outside the synthetic vocabulary.*'blond'"):
        D.WordEncoder().tokenize("a blond person")


def test_render_draws_the_identity_and_the_scene():
    rng = np.random.default_rng(0)
    ident = D.identities(1)[0]
    scene = {"expression": "crying", "pose": "facing front", "background": "teal"}
    im, mask = D.render([ident], scene, rng)
    assert im.shape == (D.SIZE, D.SIZE, 3) and mask.shape == (D.SIZE, D.SIZE)
    assert tuple(im[0, 0]) == D.BACKGROUNDS["teal"] and mask[0, 0] == 0 and mask[D.SIZE // 2, D.SIZE // 2] == 1
    other = D.render([ident], {**scene, "expression": "smiling"}, np.random.default_rng(0))[0]
    assert (im != other).any(axis=-1).sum() > 4          # the expression shows
    two, _ = D.render([ident, D.identities(2)[1]], scene, rng)
    assert two.shape == (D.SIZE, 2 * D.SIZE, 3)


def test_codec_round_trip_is_exact():
    x = torch.rand(2, D.SIZE, 2 * D.SIZE, 3)
    lat = D.PixelCodec().encode(x)
    assert lat.shape == (2, 3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, 2 * D.SIZE // D.FACTOR)
    torch.testing.assert_close(D.PixelCodec().decode(lat), x, rtol=0, atol=1e-6)


def test_tiny_base_model_is_patchable_and_trains_an_adapter_step(tmp_path):
    import random_models
    from PIL import Image
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    patcher = D.build_base(D.unet_config(32))
    random_models.randomize_(patcher.model.diffusion_model.out, 1)   # untrained base has a zero output layer
    layers = find_layers(patcher.model.diffusion_model)
    assert len(layers) == 7                              # 2 input, middle, 4 output cross-attention layers
    rng = np.random.default_rng(0)
    for i, ident in enumerate(D.identities(2)):
        os.makedirs(tmp_path / f"id{i}")
        for j in range(2):
            scene = D.random_scene(rng)
            Image.fromarray(D.render([ident], scene, rng)[0]).save(tmp_path / f"id{i}" / f"{j}.png")
            (tmp_path / f"id{i}" / f"{j}.txt").write_text(D.caption(scene))
    cfg = TrainConfig(steps=1, batch_size=2, save_every=1, init="attn1", gradient_checkpointing=True)
    t = Trainer(patcher, D.WordEncoder(), D.PixelCodec(), FaceDataset(str(tmp_path), D.SIZE), str(tmp_path / "out"), "tiny", cfg)
    before = {k: v.clone() for k, v in t.adapter.state_tensors().items()}
    t.run()
    assert np.isfinite(t.losses[0][1])
    assert all(not torch.equal(before[k], v) for k, v in t.adapter.state_tensors().items())
    assert IDFusionAdapter.load(str(tmp_path / "out" / "tiny.safetensors")).family == "SyntheticFaces"
