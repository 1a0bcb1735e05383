"""Training IDFusion adapters for ComfyUI's Flux DiT with the one Trainer (idfusion/train.py) through the Flux glue
(patch_flux.py: the attention override with block info, the DiT's own reference pass), on a narrow random Flux built
by ComfyUI's own Flux config class: only Linear_kf/Linear_vf get gradients, the gradient through Flux's blocks (which
update their input in place) matches finite differences, a fixed batch is learnt, resume repeats an uninterrupted
run, the loss is the model's own flow objective, the Train node trains under torch.inference_mode() as ComfyUI runs
it and its adapter loads and Applies on the same model, the reference pass stops on ComfyUI's interrupt. On 0.3.52
(no hooks) the node says which ComfyUI version it needs. A real server trains one at Flux-dev width in
test_flux_train_server.py."""
import os
import shutil

import numpy as np
import pytest
import torch

import random_flux
import random_models
from helpers import make_face_dataset

import idfusion_pack
from idfusion_pack.idfusion import patch_flux, synthetic
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.dataset import FaceDataset
from idfusion_pack.idfusion.train import TrainConfig, Trainer, _loss_weight
from idfusion_pack.nodes import adapter_nodes, apply_nodes, identity_nodes

HOOKS = patch_flux.missing_hooks() is None
needs_hooks = pytest.mark.skipif(not HOOKS, reason="needs ComfyUI's attention override hooks (0.3.75)")
WORDS = ["a", "photo", "of", "ann", "bob", "smiling", "person"]
COMMON = dict(weight=1.0, start_at=0.0, end_at=1.0, uncond="text only", mode="cached")


class PooledWords(synthetic.WordEncoder):
    """The pack's word encoder with a pooled output (the mean token), as Flux's CLIP-L gives its vector input."""

    def encode_token_weights(self, token_weight_pairs):
        cond, _ = super().encode_token_weights(token_weight_pairs)
        return cond, cond.mean(1)


def word_clip(dim=48, length=8):
    """A real comfy.sd.CLIP around a tiny word encoder (Flux's text width here is 48): full CLIP-L costs seconds per
    caption on the test machine and is not what is tested."""
    import comfy.sd

    class Target:
        params = {"vocabulary": len(WORDS), "dim": dim, "length": length}
        clip = PooledWords
        tokenizer = synthetic.WordTokenizer

    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(Target, tokenizer_data={"vocabulary": WORDS, "length": length},
                         model_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu,
                                        "dtype": torch.float32})
    random_models.randomize_(clip.cond_stage_model, 11)
    return clip


def small_vae():
    """ComfyUI's AutoencoderKL with Flux's 16 latent channels, narrow (32 base channels), random, through comfy.sd.VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    dd = dict(random_flux.FLUX_VAE_DDCONFIG, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1)
    ae = random_models.randomize_(AutoencoderKL(ddconfig=dd, embed_dim=16), 5)
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": dd, "embed_dim": 16}})
    vae.latent_channels = 16
    return vae


@pytest.fixture(scope="module")
def parts():
    return word_clip(), small_vae()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_face_dataset(tmp_path_factory.mktemp("faces"))


@pytest.fixture(scope="module")
def flux():
    return random_flux.build_small_flux("dev", seed=3)


def _trainer(model, parts, ds, out, name, **kw):
    clip, vae = parts
    cfg = TrainConfig(**{"steps": 3, "batch_size": 2, "lr": 1e-3, "save_every": 1, "seed": 7, "init": "random",
                         "reference_dropout": 0.3, "face_loss_weight": 1.0, "class_prompt": "a photo of a person",
                         **kw})
    return Trainer(model, clip, vae, ds, str(out), name, cfg)


@needs_hooks
def test_only_the_adapter_gets_gradients_and_a_fixed_batch_is_learnt(flux, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    dm = flux.model.diffusion_model
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    t = _trainer(flux, parts, ds, tmp_path, "fixed", lr=3e-3, reference_dropout=0.0, face_loss_weight=0.0)
    assert [l.key for l in t.adapter.layers] == [("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0)]
    assert t.glue.family == "Flux"
    fixed = t._batch(0)
    assert fixed["y"] is not None and fixed["y"].shape == (2, 48)  # the captions' pooled text: Flux's vector input
    t._batch = lambda step: fixed  # the same rows, t and noise at every step: the loss must go down
    start = {k: v.clone() for k, v in t.adapter.state_tensors().items()}
    t.train_step()
    grads = {n: p.grad for n, p in t.adapter.named_parameters()}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or float(g.abs().sum()) == 0]
    assert all(p.grad is None and not p.requires_grad for p in dm.parameters())
    for _ in range(4):
        t.train_step()
    losses = [l for _, l in t.losses]
    print("fixed-batch losses:", [f"{l:.4f}" for l in losses])  # 2.21 -> 1.92 when written
    assert all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.92 * losses[0], losses
    assert all(not torch.equal(start[k], v) for k, v in t.adapter.state_tensors().items())
    for n, p in dm.named_parameters():
        assert torch.equal(before[n], p.detach()), f"the frozen DiT changed: {n}"


@needs_hooks
def test_gradient_through_flux_blocks_matches_finite_differences():
    """Flux's blocks add into their input after LayerNorm saved it; the glue saves a copy. A float64 Flux, the
    training forward, d(loss)/d(adapter) along a random direction against a central difference."""
    mp = random_flux.build_small_flux("dev", seed=5, dtype=torch.float64)
    mp.model.diffusion_model.requires_grad_(False)  # frozen, as the Trainer has it
    adapter = patch_flux.fresh_adapter(mp, init="random", seed=2).to(torch.float64)
    model = patch_flux.trainable(mp)
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 3, 48, generator=g, dtype=torch.float64)
    h_f = {l.key: torch.randn(2, 9, 64, generator=g, dtype=torch.float64) for l in adapter.layers}  # a 6x6 latent
    keep = torch.tensor([True, False])
    options = patch_flux.train_options(adapter, mp.model, set())
    kw = {"y": torch.randn(2, 32, generator=g, dtype=torch.float64), "guidance": torch.full((2,), 3.5, dtype=torch.float64)}

    def loss():
        to = options(h_f, keep, x, (6, 6))
        out = model.model.apply_model(x, torch.full((2,), 0.7, dtype=torch.float64), c_crossattn=ctx,
                                      transformer_options=to, **kw)
        return (out ** 2).sum()

    params = list(adapter.parameters())
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    loss().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    eps = 1e-3  # when written: 271.198 by autograd; 267.33, 270.84, 271.155, 271.192 at steps 1e-2 .. 3e-4
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = float(loss())
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = float(loss())
        for p, d in zip(params, direction):
            p.add_(eps * d)
    numeric = (up - down) / (2 * eps)
    print(f"directional derivative: autograd {analytic:.6f}, central difference {numeric:.6f}")
    assert analytic == pytest.approx(numeric, rel=1e-3)


@needs_hooks
def test_training_forward_is_applys_forward_and_dropped_rows_the_plain_models():
    """What is trained is what Apply computes: in float64, a kept row of the training forward equals the model with
    Apply's JointAttention installed for an identity holding that row's h_f (same key norm, RoPE positions, token
    layout), with all tokens and with the pooled token budget; a row whose reference was dropped equals the plain
    model."""
    from random_models import sampler_transformer_options
    from idfusion_pack.idfusion.identity import Identity
    from idfusion_pack.idfusion.patch import Entry
    mp = random_flux.build_small_flux("dev", seed=6, dtype=torch.float64)
    mp.model.diffusion_model.requires_grad_(False)
    layers = patch_flux.find_layers(mp.model.diffusion_model)
    adapter = patch_flux.fresh_adapter(mp, init="random", seed=4).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 10, 12, generator=g, dtype=torch.float64)   # a 5x6 token grid
    ctx = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    ref_hw = (6, 8)                                                      # the reference's latent: 3x4 tokens
    h_f = {l.key: torch.randn(2, 12, 64, generator=g, dtype=torch.float64) for l in layers}
    kw = {"y": torch.randn(2, 32, generator=g, dtype=torch.float64), "guidance": torch.full((2,), 3.5, dtype=torch.float64)}
    sigma = torch.full((2,), 0.6, dtype=torch.float64)
    with torch.no_grad():
        plain = mp.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={}, **kw)
    for tokens in ("all", "pooled"):
        pooled = {l.key for l in layers} if tokens == "pooled" else set()
        train_h_f = h_f
        if pooled:  # as Trainer.token_budget pools h_f before the training forward
            from idfusion_pack.idfusion import fusion
            train_h_f = {k: fusion.pool_tokens(v, 3, 4) for k, v in h_f.items()}
        to = patch_flux.train_options(adapter, mp.model, pooled)(train_h_f, torch.tensor([True, False]), x, ref_hw)
        with torch.no_grad():
            trained = mp.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to, **kw)
        ident = Identity(layers, "Flux", {"mode": "cached", "timestep": 0, "text": "zeros"},
                         [{l.name: h_f[l.key][0] for l in layers}], [torch.zeros(1, 16, *ref_hw)],
                         torch.zeros(1, 1, 48), torch.zeros(1, 32), "row0")
        applied = patch_flux.install(mp, patch_flux.FluxFusion(adapter, [Entry(ident)], reference_tokens=tokens))
        with torch.no_grad():
            fused = applied.model.apply_model(x[:1], sigma[:1], c_crossattn=ctx[:1],
                                              transformer_options=sampler_transformer_options(applied, [0]),
                                              **{k: v[:1] for k, v in kw.items()})
        # Flux's RoPE runs in float32 in any model dtype: 1.9e-7 apart when written, against an identity effect of 0.19
        torch.testing.assert_close(trained[:1], fused, rtol=1e-5, atol=1e-6, msg=tokens)
        assert not torch.allclose(trained[:1], plain[:1]), tokens
        torch.testing.assert_close(trained[1:], plain[1:], rtol=1e-12, atol=1e-12, msg=tokens)


@needs_hooks
def test_resume_repeats_an_uninterrupted_run(flux, parts, dataset_dir, tmp_path):
    ds = FaceDataset(str(dataset_dir), 64)
    kw = dict(steps=2, cgdr_weight=0.5, reference_tokens="pooled")
    full = _trainer(flux, parts, ds, tmp_path / "a", "x", **kw)
    full.run()
    first = _trainer(flux, parts, ds, tmp_path / "b", "x", **dict(kw, steps=1))
    first.run()
    resumed = _trainer(flux, parts, ds, tmp_path / "b", "x", **kw)
    assert resumed.resume() and resumed.step == 1
    resumed.run()
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses], rel=1e-5)
    for k, v in full.adapter.state_tensors().items():
        torch.testing.assert_close(resumed.adapter.state_tensors()[k], v, rtol=1e-5, atol=1e-7)
    assert sorted(os.listdir(tmp_path / "a")) == ["x.loss.png", "x.safetensors", "x.train-state.safetensors"]
    assert IDFusionAdapter.load(str(tmp_path / "a" / "x.safetensors")).layers == full.adapter.layers


def _output_for_zero(ms, sigma, x_t, x0):
    """The model output whose denoised prediction is exactly x0: calculate_denoised is affine in the output."""
    a = ms.calculate_denoised(sigma, torch.zeros_like(x_t), x_t)
    c = a - ms.calculate_denoised(sigma, torch.ones_like(x_t), x_t)
    return (a - x0) / c


def test_loss_weight_is_each_prediction_types_own_objective(flux):
    """x0-space error times _loss_weight equals the squared error against the model's own target, for ComfyUI's
    model_sampling classes: EPS (SD1.5), V_PREDICTION, CONST (Flux: the flow velocity noise - x0), X0."""
    import comfy.model_sampling as cms
    kinds = {}
    for name, pred in (("eps", cms.EPS), ("v", cms.V_PREDICTION), ("x0", cms.X0)):
        kinds[name] = type(name, (cms.ModelSamplingDiscrete, pred), {})()
    kinds["flow (Flux)"] = flux.model.model_sampling
    assert isinstance(kinds["flow (Flux)"], cms.CONST)
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for name, ms in kinds.items():
        sigma = ms.sigmas[torch.tensor([5, len(ms.sigmas) // 2, len(ms.sigmas) - 1])].double()
        x_t = ms.noise_scaling(sigma, noise, x0)
        target = _output_for_zero(ms, sigma, x_t, x0)
        if name == "flow (Flux)":
            torch.testing.assert_close(target, noise - x0)  # the velocity: flow matching's target
        if name == "eps":
            torch.testing.assert_close(target, noise)
        err = (ms.calculate_denoised(sigma, out, x_t) - x0) ** 2 * _loss_weight(ms, sigma).view(-1, 1, 1, 1)
        torch.testing.assert_close(err, (out - target) ** 2, rtol=1e-6, atol=1e-6, msg=name)
    # Flux's schedule takes a time in (0, 1]: the Trainer's draws 0..999 cover it through the model's shift
    ms = kinds["flow (Flux)"]
    drawn = patch_flux.train_sigma(ms, torch.arange(1000.0))
    torch.testing.assert_close(drawn.float(), ms.sigmas[9::10].float())
    assert float(drawn.min()) < 0.01 and float(drawn.max()) == pytest.approx(1.0) and bool((drawn.diff() > 0).all())
    other = type("rflow", (cms.ModelSamplingDiscrete, cms.COSMOS_RFLOW), {})()
    with pytest.raises(AdapterError, match="prediction type"):
        _loss_weight(other, torch.ones(1))


def _node_args(model, parts, **kw):
    return {**dict(model=model, clip=parts[0], vae=parts[1], dataset="faces", adapter_name="flux_inf", steps=2,
                   batch_size=1, learning_rate=1e-3, resolution=64, save_every=1, seed=0, init="random",
                   reference="other image", reference_dropout=0.0, face_loss_weight=0.0, cgdr_weight=0.0,
                   class_prompt="a photo of a person", encoding="cached", resume=True), **kw}


@pytest.fixture
def node_dataset(dataset_dir, tmp_path, monkeypatch):
    import folder_paths
    inp = tmp_path / "input"
    shutil.copytree(dataset_dir, inp / "idfusion_datasets" / "faces")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp))


@needs_hooks
def test_train_node_trains_a_flux_adapter_under_inference_mode_and_it_applies(parts, node_dataset, idfusion_dir):
    """As ComfyUI runs it: the model built (loaded) under inference_mode, the node called under it. The adapter the
    New Adapter node makes for this model trains (it changes), resumes, is saved in models/idfusion, loads with the
    Load Adapter node and Applies on the same model: the cond row changes, the uncond row (text only) does not."""
    with torch.inference_mode():
        model = random_flux.build_small_flux("dev", seed=3)
    assert next(model.model.diffusion_model.parameters()).is_inference()
    node = idfusion_pack.NODE_CLASS_MAPPINGS["IDFusionTrainAdapter"]()
    with torch.inference_mode():
        first = node.train(**_node_args(model, parts, steps=1, unique_id="9"))
        fresh = adapter_nodes.IDFusionNewAdapter().create(model, "random", 0)[0]
    hist = first["ui"]["idfusion_loss"]
    assert [s for s, _ in hist] == [1] and all(np.isfinite(l) for _, l in hist)
    trained = first["result"][0]
    assert trained.layers == fresh.layers and not any(p.requires_grad for p in trained.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_tensors().values(), trained.state_tensors().values())), \
        "the adapter did not change: nothing was trained"
    with torch.inference_mode():
        second = node.train(**_node_args(model, parts, steps=2, unique_id="9"))
    assert [s for s, _ in second["ui"]["idfusion_loss"]] == [1, 2] and second["ui"]["idfusion_loss"][:1] == hist
    assert sorted(os.listdir(idfusion_dir)) == ["flux_inf.safetensors", "training"]

    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        loaded = adapter_nodes.IDFusionAdapterLoader().load("flux_inf.safetensors")[0]
        ident = identity_nodes.IDFusionEncodeReference().encode(model, parts[1], image, 0, "ann")["result"][0]
        applied = apply_nodes.IDFusionApply().apply(model, loaded, ident, **COMMON)[0]
    for k, v in second["result"][0].state_tensors().items():
        assert torch.equal(loaded.state_tensors()[k].float(), v.float())
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 4, 48, generator=g)
    to = random_models.sampler_transformer_options(applied, [1, 0])

    def forward(mp, opts):
        with torch.inference_mode():
            return mp.model.apply_model(x, torch.full((2,), 0.5), c_crossattn=c, transformer_options=opts,
                                        y=torch.zeros(2, dm.params.vec_in_dim), guidance=torch.full((2,), 3.5))
    plain = forward(model, random_models.sampler_transformer_options(model, [1, 0]))
    out = forward(applied, to)
    assert torch.isfinite(out).all() and out[0].equal(plain[0])
    assert not torch.allclose(out[1], plain[1]), "the trained adapter did not change the cond row"


@pytest.mark.skipif(HOOKS, reason="this host has the hooks; the message is for older ComfyUI (0.3.52)")
def test_training_a_flux_adapter_on_old_comfyui_says_which_version_it_needs(parts, node_dataset, idfusion_dir):
    with torch.inference_mode():
        model = random_flux.build_small_flux("dev", seed=3)
    node = idfusion_pack.NODE_CLASS_MAPPINGS["IDFusionTrainAdapter"]()
    with torch.inference_mode(), pytest.raises(
            AdapterError, match=r"IDFusion on Flux needs ComfyUI 0\.3\.75 or newer: this ComfyUI \(0\.3\.52\) lacks"):
        node.train(**_node_args(model, parts))
    assert os.listdir(idfusion_dir) == ["training"] or os.listdir(idfusion_dir) == []


@needs_hooks
def test_flux_reference_pass_stops_between_blocks_on_interrupt(flux):
    """Cancel during a reference pass: ComfyUI's interrupt flag, set as the first double block finishes, stops the
    pass before the next block starts (InterruptProcessingException), as the UNet's pass stops between layers. (0.3.75's
    own ops also check the flag, but only once a block has started computing.)"""
    import comfy.model_management as mm
    dm = flux.model.diffusion_model
    entered = []
    hooks = [dm.double_blocks[0].register_forward_hook(lambda m, a, out: mm.interrupt_current_processing(True))]
    for name, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
        for i, block in enumerate(blocks):
            hooks.append(block.register_forward_pre_hook(lambda m, a, n=name, i=i: entered.append((n, i))))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            patch_flux.run_reference_pass(flux.model, torch.device("cpu"), torch.randn(1, 16, 8, 8),
                                          torch.zeros(1), torch.zeros(1, 1, 48), torch.zeros(1, 32))
    finally:
        for h in hooks:
            h.remove()
        mm.interrupt_current_processing(False)
    assert entered == [("double", 0)], entered
