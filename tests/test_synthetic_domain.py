"""The continuous synthetic identity domain behind the shipped model (benchmarks/synthetic, idfusion/synthetic.py):
identities are continuous and fresh per split, captions never name them, held-out scenes are disjoint from training
ones, the codec is exact, the tiny base model is a ComfyUI UNet this pack can patch, the trainer takes one step on it
(x0 model: plain x0 loss), and the renderer fit (the instrument, benchmarks/synthetic/fit.py) reads clean drawings.
The report itself is `make synthetic`; this only guards its machinery."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "synthetic"))
import domain as D  # noqa: E402
import fit  # noqa: E402,F401  (the instrument: benchmarks/synthetic/fit.py)

from idfusion_pack.idfusion import synthetic  # noqa: E402
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter, find_layers  # noqa: E402


def test_identities_are_continuous_fresh_per_split_and_captions_never_name_them():
    train, evaluation = D.identities("training", 200), D.identities("evaluation", 50)
    vt = np.stack([D.identity_vector(i) for i in train])
    ve = np.stack([D.identity_vector(i) for i in evaluation])
    # a continuous space, not a palette: no two identities share a value, and no evaluation identity is a training one
    assert len(np.unique(vt[:, 0].round(6))) == len(train)
    nearest = np.abs((ve[:, None] - vt[None]) / D.identity_scale()).sum(-1).min(1)
    assert nearest.min() > 0.5, nearest.min()
    for ident in train + evaluation:
        for k, (lo, hi) in D.GEOMETRY.items():
            assert lo <= ident[k] <= hi
        assert all(lo <= v <= hi for v, (lo, hi) in zip(ident["skin"], D.SKIN_LAB.values()))
        assert np.all((D.lab_to_srgb(ident["hair"]) >= -1e-9) & (D.lab_to_srgb(ident["hair"]) <= 1 + 1e-9))
    assert not D.in_band(D.hue(vt[:, 3:6])).any()             # no training hair in the extrapolation band
    extra = np.stack([D.identity_vector(i) for i in D.identities("extrapolation", 50)])
    assert D.in_band(D.hue(extra[:, 3:6])).all()
    assert D.identities("evaluation", 3)[2]["face_w"] == evaluation[2]["face_w"]   # a split's prefix is stable
    # captions describe the scene only
    scene_words = {w for v in D.SCENE_ATTRS.values() for x in v for w in x.split()}
    assert set(D.vocabulary()) <= scene_words | {"a", "photo", "of", "person", "two", "people", "background"}
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": D.vocabulary(), "length": 16})
    with pytest.raises(AdapterError, match=r"does not know: \['blond'\]"):
        tok.tokenize_with_weights("a photo of a blond person")


def _ident(**over):
    mid = {k: (lo + hi) / 2 for k, (lo, hi) in D.GEOMETRY.items()}
    return {"skin": np.array([60.0, 15.0, 20.0]), "hair": np.array([50.0, 0.0, 0.0]), "eyes": np.array([40.0, 5.0, 5.0]),
            **mid, **over}


def test_identity_descriptions_name_each_attribute_with_its_own_words():
    # the words a described base model learns from (issue 17's caption study): each attribute's own modifier, no scene
    # word reused, the middle third of a shape range unnamed, and no word for the extrapolation hue band
    lch = lambda L, C, h: np.array([L, C * np.cos(np.radians(h)), C * np.sin(np.radians(h))])   # noqa: E731
    assert D.descriptors(_ident()) == ["tan skin", "silver hair", "darkeyed"]
    assert D.descriptors(_ident(hair=lch(55, 40, 40), skin=np.array([80.0, 10, 10]))) == \
        ["pale skin", "red hair", "darkeyed"]
    assert "brown hair" in D.descriptors(_ident(hair=lch(30, 30, 60)))
    assert "ginger hair" in D.descriptors(_ident(hair=lch(60, 30, 60)))
    lo, hi = D.GEOMETRY["face_w"]
    assert "narrow face" in D.descriptors(_ident(face_w=lo)) and "broad face" in D.descriptors(_ident(face_w=hi))
    assert not any("face" in w for w in D.descriptors(_ident()))
    assert "green hair" in D.descriptors(D.identities("extrapolation", 1)[0]) and "green" not in D.vocabulary(True)
    scene_words = set(D.vocabulary())
    vocab = D.vocabulary(described=True)
    rng = np.random.default_rng(0)
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": vocab, "length": 16})
    for ident in D.identities("training", 300):
        words = D.descriptors(ident)
        modifiers = [w.split()[0] for w in words]
        assert len(set(modifiers)) == len(modifiers) and not set(modifiers) & scene_words, words
        text = D.described_caption(D.caption(D.random_scene(rng)), ident, rng)
        extra = text.split(", ")[4:]
        assert 1 <= len(extra) <= 3 and set(extra) <= set(words), text
        tok.tokenize_with_weights(text)   # every word known
        assert len(text.replace(",", "").split()) <= 16   # nothing cut off by the encoder's length


def test_described_base_pool_keeps_the_pictures_and_describes_a_share_of_one_person_captions():
    import run as R   # benchmarks/synthetic/run.py
    plain = R.render_pool(R.SCALES["smoke"], seed=1)
    described = R.render_pool({**R.SCALES["smoke"], "describe": 0.5}, seed=1)
    assert np.array_equal(plain[0], described[0]) and np.array_equal(plain[2], described[2])
    assert described[3] == plain[3]                     # two-person captions stay scene-only
    longer = [d != p for p, d in zip(plain[1], described[1])]
    assert all(d.startswith(p) for p, d in zip(plain[1], described[1]))
    assert 0.3 < np.mean(longer) < 0.7, np.mean(longer)
    settings = R.base_settings({**R.SCALES["smoke"], "describe": 0.5})
    assert settings["describe"] == 0.5 and "broad" in settings["vocabulary"]
    assert "describe" not in R.base_settings(R.SCALES["smoke"]) and "broad" not in R.base_settings(R.SCALES["smoke"])["vocabulary"]


def test_eye_words_name_the_eye_colour_and_an_eye_words_pool_keeps_the_pictures():
    # eye_words_study.py's base: captions naming the eye colour's lightness and hue, the pictures unchanged
    import run as R   # benchmarks/synthetic/run.py
    lch = lambda L, C, h: np.array([L, C * np.cos(np.radians(h)), C * np.sin(np.radians(h))])   # noqa: E731
    assert D.eye_words(_ident(eyes=lch(30, 40, 250))) == ["darkeyed", "blueeyed"]
    assert D.eye_words(_ident(eyes=lch(60, 40, 140))) == ["lighteyed", "greeneyed"]
    assert D.eye_words(_ident(eyes=lch(60, 40, 350))) == ["lighteyed", "redeyed"]
    assert D.eye_words(_ident(eyes=lch(60, 10, 250))) == ["lighteyed", "greyeyed"]   # too grey for a hue
    plain = R.render_pool(R.SCALES["smoke"], seed=1)
    worded = R.render_pool({**R.SCALES["smoke"], "describe_eyes": 0.5}, seed=1)
    assert np.array_equal(plain[0], worded[0]) and np.array_equal(plain[2], worded[2])
    assert worded[3] == plain[3]                        # two-person captions stay scene-only
    longer = [w != p for p, w in zip(plain[1], worded[1])]
    assert 0.3 < np.mean(longer) < 0.7, np.mean(longer)
    settings = R.base_settings({**R.SCALES["smoke"], "describe_eyes": 0.5})
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": settings["vocabulary"], "length": 16})
    for p, w in zip(plain[1], worded[1]):
        assert w == p or w.split(", ")[-2:] in ([a, b] for a in ("darkeyed", "lighteyed")
                                                 for b in ["greyeyed", *dict(D.EYE_HUES).values()]), w
        tok.tokenize_with_weights(w)   # every word known
        assert len(w.replace(",", "").split()) <= 16   # nothing cut off by the encoder's length
    assert settings["describe_eyes"] == 0.5 and "blueeyed" in settings["vocabulary"]
    assert "describe_eyes" not in R.base_settings(R.SCALES["smoke"])
    assert "blueeyed" not in R.base_settings(R.SCALES["smoke"])["vocabulary"]


def test_base_width_option_builds_that_unet_and_leaves_the_default_settings_alone():
    import run as R   # benchmarks/synthetic/run.py: base_study.py's wide arm is {channels, mult} in the scale
    smoke = R.SCALES["smoke"]
    assert R.base_settings({**smoke, "mult": (1, 2)}) == R.base_settings(smoke)   # the default: same cache key
    wide = R.base_settings({**smoke, "channels": 64, "mult": (1, 1)})
    assert R.key(wide) != R.key(R.base_settings(smoke))
    dm = synthetic.build_patcher(wide["unet"], prediction="x0").model.diffusion_model
    widths = [m.out_channels for m in dm.modules() if type(m).__name__ == "ResBlock"]
    assert widths and set(widths) == {64}, widths


def test_colour_conversions_round_trip():
    rgb = np.random.default_rng(0).uniform(0, 1, (100, 3))
    np.testing.assert_allclose(D.lab_to_srgb(D.srgb_to_lab(rgb)), rgb, atol=1e-9)
    np.testing.assert_allclose(D.srgb_to_lab([1.0, 1.0, 1.0]), [100, 0, 0], atol=1e-3)


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
    ident = D.identities("evaluation", 1)[0]
    scene = {"expression": "crying", "pose": "facing front", "background": "teal"}
    im, mask = D.render([ident], scene, rng, jitter=[(0.0, 0.0)])
    assert im.shape == (D.SIZE, D.SIZE, 3) and mask.shape == (D.SIZE, D.SIZE)
    assert tuple(im[0, 0]) == D.BACKGROUNDS["teal"] and mask[0, 0] == 0 and mask[D.SIZE // 2, D.SIZE // 2] > 0.99
    cheek = im[int(D.SIZE * 0.6), int(D.SIZE * 0.5 - ident["face_w"] * D.SIZE * 0.6)]   # left cheek: skin
    assert D.delta_e(D.srgb_to_lab(cheek / 255), ident["skin"]) < 1.5
    width = (mask[int(D.SIZE * 0.53)] > 0.5).sum()          # across the face centre: the face ellipse is widest
    assert abs(width - 2 * ident["face_w"] * D.SIZE) < 3
    other = D.render([ident], {**scene, "expression": "smiling"}, rng, jitter=[(0.0, 0.0)])[0]
    assert (im != other).any(axis=-1).sum() > 20          # the expression shows
    two, _ = D.render([ident, D.identities("evaluation", 2)[1]], scene, rng)
    assert two.shape == (D.SIZE, 2 * D.SIZE, 3)
    assert 2 * D.GEOMETRY["face_w"][0] * D.SIZE >= 64     # every face is at least 64 px wide


def test_the_instrument_reads_drawings_of_fresh_identities_and_tells_them_apart():
    """The renderer fit on clean drawings: colours within a few ΔE, geometry within a pixel, the scene exactly, and
    each picture retrieves its own identity among 100, not another's (the same reads against shuffled truths)."""
    import fit as F
    rng = np.random.default_rng(1)
    ids = D.identities("evaluation", 8)
    scenes = [D.random_scene(rng) for _ in ids]
    pics, _ = D.render_batch([[i] for i in ids], scenes, rng.uniform(-D.JITTER, D.JITTER, (8, 1, 2)))
    reads = F.fit(pics)
    s = F.summarise(reads, ids, scenes)
    assert s["skin"]["mean"] < 2 and s["hair"]["mean"] < 2 and s["eyes"]["mean"] < 8, s
    assert all(s[k]["mean"] < 1.0 for k in D.GEOMETRY), s
    assert all(s[k]["p"] == 1.0 for k in D.SCENE_ATTRS), s
    cands = D.identities("candidates", 99)
    assert all(F.retrieval_rank(r["identity"], 0, [t] + cands) == 0 for r, t in zip(reads, ids))
    shuffled = ids[1:] + ids[:1]
    assert sum(F.retrieval_rank(r["identity"], 0, [t] + cands) == 0 for r, t in zip(reads, shuffled)) == 0
    drawn = F.redraw(reads) * 2 - 1                           # what the fit saw is what the picture shows
    assert (drawn - pics).abs().mean() < 0.02


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
    for i, ident in enumerate(D.identities("training", 2)):
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

    # the token budget, trained (issue 17): pooled training pools h_f at exactly the layers, and in exactly the way,
    # that IDFusion Apply pools at inference, so an adapter trained pooled sees at inference what it was trained on
    from idfusion_pack.idfusion.patch import Entry, Fusion
    pooled = Trainer(patcher, clip, synthetic.PixelCodec(D.POOL, D.FACTOR), FaceDataset(str(tmp_path), D.PICTURE),
                     str(tmp_path / "out_pooled"), "tiny_pooled", TrainConfig(**{**cfg.__dict__, "reference_tokens": "pooled"}))
    g = torch.Generator().manual_seed(0)
    h_f = {l.key: torch.randn(2, (12 * 12) // (4 if l.channels > 32 else 1), l.channels, generator=g) for l in layers}
    got = pooled.token_budget(h_f, (12, 12))
    infer = Fusion(pooled.adapter, [], reference_tokens="pooled")
    latent = torch.zeros(1, 3 * D.FACTOR ** 2, 12, 12)
    changed = 0
    for l in layers:
        want = torch.stack([infer._tokens(l, h, latent) for h in h_f[l.key]])
        assert torch.equal(got[l.key], want), l.key
        changed += got[l.key].shape[1] != h_f[l.key].shape[1]
    assert changed == 3           # the three 12x12 layers (first input, last two output), 144 -> 36 tokens
    assert all(torch.equal(t.token_budget(h_f, (12, 12))[k], v) for k, v in h_f.items())   # 'all' pools nothing
    with torch.inference_mode():
        pooled.run()
    assert np.isfinite(pooled.losses[0][1])


def test_the_dit_family_is_comfyuis_flux_class_on_the_flow_schedule_with_an_x0_output(tmp_path):
    """synthetic.build_patcher(architecture="flux"): ComfyUI's own Flux class (so the Flux glue takes it) on
    ComfyUI's flow schedule x_t = sigma * noise + (1 - sigma) * x0, whose network outputs x0 (the trainer's loss is then
    the plain x0 error); the file keeps the config under dit_config and loads back the same network."""
    import random_models
    import comfy.model_sampling as cms
    from comfy.ldm.flux.model import Flux
    from idfusion_pack.idfusion import patch_flux
    from idfusion_pack.idfusion.train import _loss_weight
    cfg = synthetic.flux_config(3 * D.FACTOR ** 2, hidden=32, heads=2, depth=1, depth_single=1)
    assert sum(cfg["axes_dim"]) == 16 and cfg["patch_size"] == 1
    patcher = synthetic.build_patcher(cfg, prediction="x0", architecture="flux")
    assert type(patcher.model.diffusion_model) is Flux and patch_flux.is_flux(patcher)
    ms = patcher.get_model_object("model_sampling")
    assert isinstance(ms, cms.ModelSamplingFlux) and isinstance(ms, cms.CONST)
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.25, 0.75])
    s4 = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(ms.noise_scaling(s4, noise, x0), s4 * noise + (1 - s4) * x0)
    assert torch.equal(ms.calculate_denoised(sigma, out, noise), out)
    assert torch.equal(_loss_weight(ms, sigma), torch.ones(2))
    with pytest.raises(AdapterError, match="prediction"):
        synthetic.build_patcher(cfg, prediction="v", architecture="flux")
    flow = synthetic.build_patcher(cfg, prediction="flow", architecture="flux").get_model_object("model_sampling")
    x_t = ms.noise_scaling(s4, noise, x0)
    torch.testing.assert_close(flow.calculate_denoised(sigma, noise - x0, x_t), x0)   # Flux's own velocity output

    random_models.randomize_(patcher.model.diffusion_model, 2)
    state = patcher.model.diffusion_model.state_dict()
    clip = synthetic.make_clip(D.vocabulary(), cfg["context_in_dim"], 16)
    path = str(tmp_path / "flux_synthetic.safetensors")
    synthetic.save(path, cfg, state, clip.cond_stage_model.state_dict(), D.vocabulary(), 16,
                   synthetic.PixelCodec(D.POOL, D.FACTOR), {"prediction": "x0"}, dtype=torch.float32, architecture="flux")
    if patch_flux.missing_hooks() is not None:   # 0.3.52: its Flux cannot fold patch-1 outputs; the loader says so
        with pytest.raises(AdapterError, match="0.3.75 or newer"):
            synthetic.load(path)
        return
    loaded = synthetic.load(path)[0]
    for k, v in loaded.model.diffusion_model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(loaded.get_model_object("model_sampling"), cms.X0)


def test_feature_map_covers_the_eyes_and_mouth_only_and_leaves_the_training_pictures_alone():
    import run as R   # base_study.py --arm features weighs these pixels in the base's loss
    ident = D.identities("validation", 1)[0]
    scene = {"expression": "neutral", "pose": "facing front", "background": "grey"}
    fmap = D.feature_map([[ident]], [scene], [[(0.0, 0.0)]])[0]
    p = {k: float(v[0]) for k, v in D.params([ident], [scene], [(0.0, 0.0)]).items()}
    eye_y = int(p["cy"] - 0.12 * p["ah"])
    for sx in (-1, 1):                                      # each iris centre is wholly feature
        assert fmap[eye_y, int(p["cx"] + sx * p["spacing"])] > 0.99
    assert fmap[eye_y, int(p["cx"])] < 0.01                 # skin between the eyes is not
    assert fmap[0, 0] == 0 and fmap[int(p["cy"] - 0.5 * p["ah"]), int(p["cx"])] < 0.01   # background, forehead
    assert fmap[int(p["cy"] + 0.45 * p["ah"]), int(p["cx"])] > 0.5                        # the mouth's line
    assert 0.005 < float(fmap.mean()) < 0.08, float(fmap.mean())
    small = {**R.SCALES["smoke"], "pool": (40, 12)}
    plain, weighted = R.render_pool(small, 3), R.render_pool(small, 3, features=True)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(plain, weighted[:4]))
    assert weighted[4].shape == (40, D.SIZE, D.SIZE) and weighted[5].shape == (12, D.SIZE, 2 * D.SIZE)
    assert R.feature_weight("min-snr-5+features-30") == ("min-snr-5", 30.0) and R.feature_weight("v") == ("v", 0.0)
    sigma = torch.tensor([0.1, 10.0])
    assert torch.equal(R.loss_weight(sigma, "min-snr-5+features-30"), R.loss_weight(sigma, "min-snr-5"))


def test_a_first_phase_weighting_changes_only_that_base_and_weighs_the_features_from_step_one(tmp_path):
    import run as R   # base_study.py --arm features-scratch: the shipped recipe with the features weighed in every phase
    smoke = {**R.SCALES["smoke"], "base_steps": 6, "then": []}
    assert "weighting" not in R.base_settings(R.SCALES["cpu"])   # the shipped base's cache key is untouched
    plain = R.train_base(smoke, str(tmp_path / "plain"), torch.device("cpu"))
    weighted = R.train_base({**smoke, "base_weighting": "v+features-10"}, str(tmp_path / "weighted"), torch.device("cpu"))
    assert weighted[2]["weighting"] == "v+features-10" and R.key(weighted[2]) != R.key(plain[2])
    # same seeds, pictures and steps: only the features' weight in the first phase's loss differs
    assert any(not torch.equal(a, weighted[0][k]) for k, a in plain[0].items())
    again = R.train_base({**smoke, "base_weighting": "v"}, str(tmp_path / "v"), torch.device("cpu"))
    assert all(torch.equal(a, again[0][k]) for k, a in plain[0].items())   # "v" spelt out is the default


def test_a_features_weighted_dataset_keeps_the_pictures_and_weighs_the_eyes_and_mouth_in_its_masks(tmp_path):
    import run as R   # eye_loss_study.py: the adapter's loss weighs the eyes and mouth through the dataset's masks
    from PIL import Image
    idents = D.identities("validation", 2)
    R.write_dataset(str(tmp_path / "plain"), idents, 2, seed=5)
    R.write_dataset(str(tmp_path / "weighted"), idents, 2, seed=5, features=10.0)
    read = lambda *p: np.asarray(Image.open(tmp_path.joinpath(*p)), dtype=np.float64) / 255   # noqa: E731
    for n in ("000", "001"):
        assert np.array_equal(read("plain", "id0000", n + ".png"), read("weighted", "id0000", n + ".png"))
        face, mask = read("plain", "id0000", n + "_mask.png"), read("weighted", "id0000", n + "_mask.png")
        # 1 + 11 * mask = 1 + face + 10 * features: the face weighs as shipped, the eyes and mouth 10 more
        whole_face, features = face > 0.99, mask > 0.9
        skin = whole_face & (mask < 0.1)
        assert features.sum() > 20 and skin.sum() > 1000
        weight = mask[skin] * 11                                          # skin: 1/11 (8-bit), edges of features above
        assert abs(np.median(weight) - 1) < 0.02 and weight.min() > 0.98
        assert np.abs(mask[face == 0]).max() == 0                         # background: 0
    plain_dir, weighted_dir = R.adapter_data("w", 2, 2, synthetic.PixelCodec(1, 8)), R.adapter_data("w", 2, 2, synthetic.PixelCodec(1, 8), 10.0)
    assert plain_dir != weighted_dir and plain_dir == R.adapter_data("w", 2, 2, synthetic.PixelCodec(1, 8), 0.0)


def test_reproduce_check_tells_rounding_chance_and_real_differences_apart(tmp_path):
    """benchmarks/synthetic/reproduce_check.py, which compares a from-scratch `make synthetic` with the shipped files:
    the date every run rewrites is ignored, a last-digit difference is rounding, a figure that moved gets its z."""
    import json
    import reproduce_check as R
    from safetensors.torch import save_file
    for name, bump, figure, rounding in (("shipped", 0.0, 0.30, 0.1), ("rebuilt", 0.25, 0.36, 0.1 + 1e-12)):
        root = tmp_path / name
        for m in R.MODELS:
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            save_file({"a": torch.ones(3), "b": torch.full((2,), 1.0 + bump)}, str(root / m),
                      {"figures": json.dumps({"date": name, "retrieval": 0.3})})
        (root / R.RESULTS).parent.mkdir(parents=True)
        (root / R.RESULTS).write_text(json.dumps({"date": name, "seconds": {"base": len(name)}, "mean": rounding,
                                                  "retrieval": {"p": figure, "se": 0.03, "n": 256}}))
        (root / R.ASSETS).mkdir(parents=True)
        (root / R.ASSETS / "fresh_0.png").write_bytes(b"same")
    out = tmp_path / "report.json"
    assert R.main(["--rebuilt", str(tmp_path / "rebuilt"), "--shipped", str(tmp_path / "shipped"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for m in R.MODELS:
        assert (r["models"][m]["bit_equal"], r["models"][m]["largest_difference"]) == (1, 0.25)
        assert r["models"][m]["largest_in"] == "b" and r["models"][m]["metadata_differs"] == []
    res = r["results"]
    assert (res["equal but for rounding"], res["figures that differ"], res["of them |z| > 2"]) == (1, 1, 0)
    (fig,) = res["figures"]
    assert fig["path"] == "/retrieval" and abs(fig["z"] - 0.06 / (0.03 * 2 ** 0.5)) < 0.01
    assert [d["path"] for d in res["differences"]] == ["/retrieval/p"]
    assert r["assets"] == {"fresh_0.png": True}
