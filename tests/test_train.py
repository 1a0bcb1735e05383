"""Training core: dataset handling, only the adapter trains, atomic checkpoints and exact resume, the node's
output folder, and the node under torch.inference_mode() as ComfyUI runs it. A narrow SD1.5-layout UNet with random
weights (16 attn2 layers; full width is not the point here), 64 px images (8x8 latents), a few steps."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import small_unet
from helpers import make_face_dataset

import idfusion_pack
from idfusion_pack.idfusion.adapter import IDFusionAdapter
from idfusion_pack.idfusion.dataset import FaceDataset
from idfusion_pack.idfusion.train import TrainConfig, Trainer, lr_factor


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_face_dataset(tmp_path_factory.mktemp("faces"))


@pytest.fixture(scope="module")
def parts():
    import random_models
    return random_models.build_clip(seed=4), random_models.build_vae(seed=5)


@pytest.fixture(scope="module")
def sd15():
    """Overrides conftest's full-width sd15 in this module: same layout, 32 base channels."""
    return small_unet(seed=1)


def test_dataset_skips_unreadable_files_and_pairs_references(dataset_dir):
    ds = FaceDataset(str(dataset_dir), 64)
    assert len(ds) == 4 and len(ds.skipped) == 1 and ds.skipped[0].endswith("broken.png")
    assert set(ds.by_identity) == {"ann", "bob"}
    item = ds.load(0, torch.Generator().manual_seed(0))
    assert item["image"].shape == (64, 64, 3) and item["reference"].shape == (64, 64, 3)
    assert item["mask"] is not None and item["caption"] == "a photo of ann"
    # the reference is the other image of the same identity
    other = ds.load(1, torch.Generator().manual_seed(0))["image"]
    assert torch.equal(item["reference"], other)


def test_reference_augmentation_changes_only_the_reference_as_configured(dataset_dir):
    """TrainConfig's reference_background / _shift / _noise (issue 17: the identity must not hang on where the face
    sits, on clean pixels or on the background): the target picture never changes; the background outside the
    reference's own mask takes one colour while the person stays; a shift moves whole pixels with edges repeated;
    noise has the asked sd; no option set draws nothing, so runs without augmentation stay bit for bit."""
    ds = FaceDataset(str(dataset_dir), 64)
    idx = 1                                   # ann1: its reference is ann0, which has a mask
    g = lambda seed=0: torch.Generator().manual_seed(seed)
    plain = ds.load(idx, g())
    off = {"shift": 0.0, "noise": 0.0, "background": 0.0}
    g0 = g()
    same = ds.load(idx, g0, augment=off)
    assert torch.equal(same["reference"], plain["reference"])
    assert torch.equal(g0.get_state(), (lambda gg: (ds.load(idx, gg), gg.get_state())[1])(g()))

    with Image.open(dataset_dir / "ann" / "ann0_mask.png") as m:
        mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)
    bg = ds.load(idx, g(), augment={**off, "background": 1.0})
    assert torch.equal(bg["image"], plain["image"])
    person, back = mask > 0.99, mask < 0.01
    assert torch.equal(bg["reference"][person], plain["reference"][person])
    colours = bg["reference"][back]
    assert torch.allclose(colours, colours[:1].expand_as(colours)), "the background is not one colour"
    assert not torch.allclose(colours, plain["reference"][back])

    moved = []
    for seed in range(6):
        shifted = ds.load(idx, g(seed), augment={**off, "shift": 0.25})["reference"]
        ref = plain["reference"]
        found = [(dy, dx) for dy in range(-16, 17) for dx in range(-16, 17)
                 if torch.equal(shifted, ref[(torch.arange(64) - dy).clamp(0, 63)][:, (torch.arange(64) - dx).clamp(0, 63)])]
        assert found, f"seed {seed}: not a whole-pixel shift of at most 16 px with edges repeated"
        moved.append(found[0] != (0, 0))
    assert sum(moved) >= 4, moved

    noisy = ds.load(idx, g(), augment={**off, "noise": 12.0})["reference"]
    ref = plain["reference"]
    mid = (ref > 0.2) & (ref < 0.8)
    assert (noisy - ref)[mid].std().item() * 255 == pytest.approx(12.0, rel=0.15)
    assert torch.equal(noisy, ds.load(idx, g(), augment={**off, "noise": 12.0})["reference"])


@pytest.mark.parametrize("name,value", [("reference_shift", float("nan")), ("reference_shift", 0.6),
                                        ("reference_noise", -1.0), ("reference_background", 1.5)])
def test_trainer_refuses_augmentation_out_of_range_naming_it(sd15, parts, dataset_dir, tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        _trainer(sd15, parts, FaceDataset(str(dataset_dir), 64), tmp_path, "bad", **{name: value})


def test_augmented_training_batches_carry_the_augmented_reference(sd15, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    plain = _trainer(sd15, parts, ds, tmp_path / "a", "a")._batch(0)
    aug = _trainer(sd15, parts, ds, tmp_path / "b", "b", reference_background=1.0, reference_shift=0.2)._batch(0)
    assert torch.equal(aug["x0"], plain["x0"])
    assert not torch.equal(aug["ref"], plain["ref"])


def _trainer(sd15, parts, ds, out, name, **kw):
    clip, vae = parts
    cfg = TrainConfig(**{"steps": 3, "batch_size": 2, "lr": 1e-3, "save_every": 1, "seed": 7, "init": "random",
                         "reference_dropout": 0.3, "face_loss_weight": 1.0, **kw})
    return Trainer(sd15, clip, vae, ds, str(out), name, cfg)


def test_lr_decay_falls_on_a_half_cosine_over_the_last_steps_only():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_decay_steps=40)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert f[10:61] == [1.0] * 51                                  # constant until steps - lr_decay_steps
    assert f[80] == pytest.approx(0.5) and 0 < f[99] < 0.01         # half-way down at the middle, near zero at the end
    assert all(a > b for a, b in zip(f[60:], f[61:]))
    assert [lr_factor(s, TrainConfig(steps=100)) for s in range(100)] == [1.0] * 100   # off by default


def test_trainer_follows_the_decay_and_resumes_it_exactly(sd15, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    full = _trainer(sd15, parts, ds, tmp_path / "a", "x", steps=4, lr_decay_steps=2)
    seen = []
    full.run(on_step=lambda step, loss: seen.append(full.opt.param_groups[0]["lr"]))
    # the LR read after each step is the one the next step uses: steps 0-2 at lr, step 3 at half, then zero
    assert seen == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.0])
    first = _trainer(sd15, parts, ds, tmp_path / "b", "x", steps=2)            # constant LR up to step 2 ...
    first.run()
    resumed = _trainer(sd15, parts, ds, tmp_path / "b", "x", steps=4, lr_decay_steps=2)   # ... then the decay
    assert resumed.resume() and resumed.step == 2
    resumed.run()
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses], rel=1e-5)
    for k, v in full.adapter.state_tensors().items():
        torch.testing.assert_close(resumed.adapter.state_tensors()[k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [-1, 5, 1.5])
def test_trainer_refuses_lr_decay_steps_outside_the_run(sd15, parts, dataset_dir, tmp_path, value):
    with pytest.raises(ValueError, match="lr_decay_steps"):
        _trainer(sd15, parts, FaceDataset(str(dataset_dir), 64), tmp_path, "bad", lr_decay_steps=value)


def test_only_the_adapter_trains_and_checkpoints_are_written(sd15, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    unet = sd15.model.diffusion_model
    before = {n: p.detach().clone() for n, p in list(unet.named_parameters())[::50]}
    t = _trainer(sd15, parts, ds, tmp_path, "run", cgdr_weight=0.5)
    start = {k: v.clone() for k, v in t.adapter.state_tensors().items()}
    t.run()
    assert t.step == 3 and len(t.losses) == 3 and all(np.isfinite(l) for _, l in t.losses)
    assert all(not torch.equal(start[k], v) for k, v in t.adapter.state_tensors().items())
    for n, p in unet.named_parameters():
        assert not p.requires_grad
        if n in before:
            assert torch.equal(before[n], p.detach())
    files = sorted(os.listdir(tmp_path))
    assert files == ["run.loss.png", "run.safetensors", "run.train-state.safetensors"], files
    saved = IDFusionAdapter.load(str(tmp_path / "run.safetensors"))
    assert saved.encoding == {"mode": "cached", "timestep": 0, "text": "zeros"}
    with Image.open(tmp_path / "run.loss.png") as im:
        assert im.size == (640, 360)


def test_resume_repeats_an_uninterrupted_run(sd15, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    full = _trainer(sd15, parts, ds, tmp_path / "a", "x")
    full.run()
    first = _trainer(sd15, parts, ds, tmp_path / "b", "x", steps=2)
    first.run()
    resumed = _trainer(sd15, parts, ds, tmp_path / "b", "x")
    assert resumed.resume() and resumed.step == 2
    resumed.run()
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses], rel=1e-5)
    for k, v in full.adapter.state_tensors().items():
        torch.testing.assert_close(resumed.adapter.state_tensors()[k], v, rtol=1e-5, atol=1e-7)


def test_training_node_writes_only_inside_models_idfusion(sd15, parts, dataset_dir, idfusion_dir, tmp_path, monkeypatch):
    import folder_paths
    import shutil
    inp = tmp_path / "input"
    shutil.copytree(dataset_dir, inp / "idfusion_datasets" / "faces")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp))
    node = idfusion_pack.NODE_CLASS_MAPPINGS["IDFusionTrainAdapter"]()
    # the user's dataset, and the small example set the pack ships (issue 21: the training template trains as shipped)
    assert sorted(node.INPUT_TYPES()["required"]["dataset"][0]) == ["example_synthetic_faces", "faces"]
    args = dict(model=sd15, clip=parts[0], vae=parts[1], dataset="faces", adapter_name="mine", steps=1, batch_size=1,
                learning_rate=1e-4, resolution=64, save_every=1, seed=0, init="zeros", reference="same image",
                reference_dropout=0.0, face_loss_weight=0.0, cgdr_weight=0.0, class_prompt="a photo of a person",
                encoding="per_step", resume=True)
    out = node.train(**args)
    adapter, curve = out["result"]
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert sorted(os.listdir(idfusion_dir)) == ["mine.safetensors", "training"]
    assert IDFusionAdapter.load(str(idfusion_dir / "mine.safetensors")).encoding["mode"] == "per_step"
    for bad in ("../x", "a/b", "x y", "ok\n", "a.b", "", "x" * 101, "tab\there"):
        with pytest.raises(ValueError, match="adapter_name"):
            node.train(**{**args, "adapter_name": bad})
    for bad in ("..", "../faces", "faces\n", "a/b"):
        with pytest.raises(ValueError, match="dataset"):
            node.train(**{**args, "dataset": bad})
    assert sorted(os.listdir(idfusion_dir)) == ["mine.safetensors", "training"]


def _node_args(model, parts, **kw):
    return {**dict(model=model, clip=parts[0], vae=parts[1], dataset="faces", adapter_name="inf", steps=2, batch_size=1,
                learning_rate=1e-3, resolution=64, save_every=1, seed=0, init="random", reference="other image",
                reference_dropout=0.0, face_loss_weight=0.0, cgdr_weight=0.0, class_prompt="a photo of a person",
                encoding="cached", resume=True), **kw}


def test_training_node_trains_under_inference_mode_like_comfyui(parts, dataset_dir, idfusion_dir, tmp_path, monkeypatch):
    """ComfyUI runs every node under torch.inference_mode() and loads models there too, so the model's weights, the
    CLIP and VAE are inference tensors. The node must still train (it failed at step 0 with 'element 0 of tensors
    does not require grad'), resume (optimizer state read back), and hand the page its events and loss history."""
    import folder_paths
    import shutil
    inp = tmp_path / "input"
    shutil.copytree(dataset_dir, inp / "idfusion_datasets" / "faces")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp))
    model = small_unet(seed=3, inference=True)
    probe = next(model.model.diffusion_model.parameters())
    assert probe.is_inference()
    node = idfusion_pack.NODE_CLASS_MAPPINGS["IDFusionTrainAdapter"]()
    assert node.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}
    with torch.inference_mode():
        first = node.train(**_node_args(model, parts, unique_id="17"))
    hist = first["ui"]["idfusion_loss"]
    assert [s for s, _ in hist] == [1, 2] and all(np.isfinite(l) for _, l in hist)
    adapter = first["result"][0]
    assert not any(p.requires_grad for p in adapter.parameters())
    fresh = IDFusionAdapter.fresh(model, init="random", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_tensors().values(), adapter.state_tensors().values())), \
        "the adapter did not change: nothing was trained"
    with torch.inference_mode():  # resume to 4 steps: the history keeps the first two
        second = node.train(**_node_args(model, parts, steps=4, unique_id="17"))
    hist2 = second["ui"]["idfusion_loss"]
    assert [s for s, _ in hist2] == [1, 2, 3, 4] and hist2[:2] == hist
    # the frozen UNet is not trained and still gives the same output under inference mode
    assert not any(p.requires_grad for p in model.model.diffusion_model.parameters())


def test_gradient_checkpointing_same_step_fewer_saved_activations(sd15, parts, dataset_dir, tmp_path):
    """Checkpointing must not change the step (same loss and updated weights) and must cut what autograd keeps:
    bytes of non-parameter tensors saved for backward, counted with saved_tensors_hooks."""
    ds = FaceDataset(str(dataset_dir), 64)
    params = {p.data_ptr() for p in sd15.model.parameters()}
    runs = {}
    for gc in (False, True):
        t = _trainer(sd15, parts, ds, tmp_path / str(gc), "g", gradient_checkpointing=gc, steps=1)
        saved = {}

        def pack(x):
            if x.data_ptr() not in params:
                saved[x.data_ptr()] = x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            t.train_step()
        runs[gc] = (t.losses[0][1], {k: v.clone() for k, v in t.adapter.state_tensors().items()}, sum(saved.values()))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=1e-6)
    print(f"bytes saved for backward: {runs[False][2] / 2**20:.1f} MiB without checkpointing, {runs[True][2] / 2**20:.1f} MiB with")
    assert runs[True][2] < 0.25 * runs[False][2], (runs[True][2], runs[False][2])


def test_damaged_training_state_is_refused_naming_the_file(sd15, parts, dataset_dir, tmp_path):
    from safetensors.torch import save_file
    from idfusion_pack.idfusion.adapter import AdapterError
    t = _trainer(sd15, parts, FaceDataset(str(dataset_dir), 64), tmp_path, "dmg")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "dmg.train-state.safetensors"),
              metadata={"format": "idfusion.train_state", "format_version": "1"})
    with pytest.raises(AdapterError, match=r"'dmg.train-state.safetensors' is damaged.*Delete it, or set resume to false"):
        t.resume()
