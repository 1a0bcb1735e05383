"""The synthetic identity domain behind the shipped model (benchmarks/synthetic, idfusion/synthetic.py): identities
are told apart by their attributes, captions never name them, held-out scenes are disjoint from training ones, the
codec is exact, the tiny base model is a ComfyUI UNet this pack can patch, and the trainer takes one step on it
(x0 model: plain x0 loss). The report itself is `make synthetic` (about 30 minutes); this only guards its
machinery."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "synthetic"))
import domain as D  # noqa: E402

from idfusion_pack.idfusion import synthetic  # noqa: E402
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter, find_layers  # noqa: E402


def test_identities_differ_and_captions_never_name_them():
    ids = D.identities(8, seed=0)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert sum(a[k] != b[k] for k in D.IDENTITY_ATTRS) >= 2
    words = set(D.vocabulary())
    assert not words & {v for vals in D.IDENTITY_ATTRS.values() for v in vals}
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": D.vocabulary(), "length": 16})
    with pytest.raises(AdapterError, match=r"does not know: \['blond'\]"):
        tok.tokenize_with_weights("a photo of a blond person")


def test_held_out_scenes_cover_every_value_and_are_never_drawn_for_training():
    held = [s for s in D.all_scenes() if D.held_out_scene(s)]
    assert len(held) == 12
    for k, values in D.SCENE_ATTRS.items():
        assert {s[k] for s in held} == set(values)
    rng = np.random.default_rng(0)
    assert not any(D.held_out_scene(D.random_scene_from(rng, held_out=False)) for _ in range(200))
    sc = D.random_scene_from(rng, held_out=True, expression=("not", "smiling"), pose="facing left")
    assert D.held_out_scene(sc) and sc["expression"] != "smiling" and sc["pose"] == "facing left"


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


def test_codec_is_exact_on_the_models_pictures_and_matches_the_training_latents():
    codec = synthetic.PixelCodec(D.POOL, D.FACTOR)
    drawings = np.random.default_rng(0).integers(0, 256, (2, D.SIZE, 2 * D.SIZE, 3), dtype=np.uint8)
    pictures = torch.from_numpy(D.upscale(drawings)).float() / 255.0
    lat = codec.encode(pictures)
    assert lat.shape == (2, 3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, 2 * D.SIZE // D.FACTOR)
    torch.testing.assert_close(codec.decode(lat), pictures, rtol=0, atol=1e-6)
    torch.testing.assert_close(lat, D.to_latent(D.to_tensor(list(drawings))), rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="must be 8"):
        synthetic.PixelCodec(2, 2)


def test_tiny_base_model_is_patchable_and_trains_an_adapter_step(tmp_path):
    import random_models
    from PIL import Image
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer, _loss_weight
    unet = synthetic.unet_config(3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, channels=32)
    patcher = synthetic.build_patcher(unet, prediction="x0")
    random_models.randomize_(patcher.model.diffusion_model, 1)
    layers = find_layers(patcher.model.diffusion_model)
    assert len(layers) == 7                              # 2 input, middle, 4 output cross-attention layers
    ms = patcher.get_model_object("model_sampling")
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.equal(_loss_weight(ms, sigma), torch.ones(3))   # an x0 model's own loss is the plain x0 error
    vocab = D.vocabulary()
    clip = synthetic.make_clip(vocab, unet["context_dim"], 16)
    rng = np.random.default_rng(0)
    for i, ident in enumerate(D.identities(2)):
        os.makedirs(tmp_path / f"id{i}")
        for j in range(2):
            scene = D.random_scene(rng)
            Image.fromarray(D.upscale(D.render([ident], scene, rng)[0])).save(tmp_path / f"id{i}" / f"{j}.png")
            (tmp_path / f"id{i}" / f"{j}.txt").write_text(D.caption(scene))
    cfg = TrainConfig(steps=1, batch_size=2, save_every=1, init="attn1", gradient_checkpointing=True)
    t = Trainer(patcher, clip, synthetic.PixelCodec(D.POOL, D.FACTOR), FaceDataset(str(tmp_path), D.PICTURE),
                str(tmp_path / "out"), "tiny", cfg)
    before = {k: v.clone() for k, v in t.adapter.state_tensors().items()}
    with torch.inference_mode():     # as inside ComfyUI: the trainer must leave inference mode itself
        t.run()
    assert np.isfinite(t.losses[0][1])
    assert all(not torch.equal(before[k], v) for k, v in t.adapter.state_tensors().items())
    assert IDFusionAdapter.load(str(tmp_path / "out" / "tiny.safetensors")).family == "SyntheticFaces"
