"""The IDFusion nodes on a Flux model, run as ComfyUI runs them (torch.inference_mode), on a narrow random Flux built
by ComfyUI's own Flux config class: the same New Adapter / Encode Reference Face / Apply / Apply Multi-Identity nodes
pick the Flux path from the model; per-block weights with double:/single: groups; compact identity files; an adapter
or identity of the wrong family gets a clear error. On a host without the hooks (0.3.52) every entry point says which
ComfyUI version it needs instead of crashing."""
import pytest
import torch

import random_flux
import random_models
from idfusion_pack.idfusion import patch_flux
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.identity import Identity
from idfusion_pack.nodes import adapter_nodes, apply_nodes, identity_nodes

HOOKS = patch_flux.missing_hooks() is None
COMMON = dict(weight=1.0, start_at=0.0, end_at=1.0, uncond="text only", mode="cached")


@pytest.fixture(scope="module")
def flux():
    with torch.inference_mode():
        return random_flux.build_small_flux("dev", seed=3)


@pytest.fixture(scope="module")
def vae():
    """A random VAE with Flux's 16 latent channels, loaded by ComfyUI's comfy.sd.VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = random_models.randomize_(AutoencoderKL(ddconfig=random_flux.FLUX_VAE_DDCONFIG, embed_dim=16), 5)
    return comfy.sd.VAE(sd=ae.state_dict())


def images(n=1, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def forward(mp, seed=0):
    """One CFG forward (rows: uncond, cond) as ComfyUI's sampler builds transformer_options."""
    dm = mp.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    c = torch.randn(2, 4, dm.params.context_in_dim, generator=g)
    to = random_models.sampler_transformer_options(mp, [1, 0])
    with torch.inference_mode():
        return mp.model.apply_model(x, torch.full((2,), 0.5), c_crossattn=c, transformer_options=to,
                                    y=torch.zeros(2, dm.params.vec_in_dim), guidance=torch.full((2,), 3.5))


def left_right(h=32, w=32):
    m = torch.zeros(2, h, w)
    m[0, :, : w // 2] = 1
    m[1, :, w // 2:] = 1
    return m


@pytest.mark.skipif(not HOOKS, reason="needs ComfyUI's attention override hooks (0.3.75)")
def test_same_nodes_take_a_flux_identity(flux, vae, tmp_path):
    """New Adapter, Encode Reference Face, Apply (with a mask, per-block weights) and Apply Multi-Identity on Flux: the
    cond row changes, the uncond row (text only) and the input MODEL stay as they were; a compact identity file
    written and read back gives the same fused output (h_f recomputed through the same DiT)."""
    with torch.inference_mode():
        adapter = adapter_nodes.IDFusionNewAdapter().create(flux, "random", 1)[0]
        assert [l.key for l in adapter.layers] == [("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0)]
        ident = identity_nodes.IDFusionEncodeReference().encode(flux, vae, images(2), 0, "ann")["result"][0]
        other = identity_nodes.IDFusionEncodeReference().encode(flux, vae, images(1, seed=1), 0, "bob")["result"][0]
        assert ident.references == 2 and ident.h_f[0]["double_0_0"].shape == ((32 // 8 // 2) ** 2, 64)  # 32 px, VAE /8, 2x2 patches
        plain = forward(flux)
        one = apply_nodes.IDFusionApply().apply(flux, adapter, ident, **COMMON)[0]
        masked = apply_nodes.IDFusionApply().apply(flux, adapter, ident, **COMMON, attn_mask=left_right()[:1],
                                                   block_weights="double:0.5, single:1, 3:0")[0]
        multi = apply_nodes.IDFusionApplyMultiIdentity().apply(flux, adapter, left_right(), **COMMON,
                                                               identity_1=ident, identity_2=other)[0]
    assert forward(flux).equal(plain), "the input MODEL changed"
    outs = {name: forward(m) for name, m in (("one", one), ("masked", masked), ("multi", multi))}
    for name, out in outs.items():
        assert torch.isfinite(out).all(), name
        assert out[0].equal(plain[0]), f"{name}: the uncond row (text only) changed"
        assert not torch.allclose(out[1], plain[1]), f"{name}: the identity did not change the cond row"
    assert not torch.allclose(outs["one"][1], outs["masked"][1])
    fusion_ = patch_flux.ours(masked)[0].fusions[0]
    assert fusion_.layer_weights == {"double_0_0": 0.5, "double_1_0": 0.5, "single_0_0": 1.0, "single_1_0": 0.0}

    # compact file: only latents, context and thumbnails; h_f recomputed when applied
    path = str(tmp_path / "ann.safetensors")
    ident.save(path)
    loaded = Identity.load(path)
    assert all(h is None for h in loaded.h_f)
    with torch.inference_mode():
        again = apply_nodes.IDFusionApply().apply(flux, adapter, loaded, **COMMON)[0]
    torch.testing.assert_close(forward(again), outs["one"], rtol=1e-5, atol=1e-5)
    # the adapter file round-trips and still fits
    apath = str(tmp_path / "flux_adapter.safetensors")
    adapter.save(apath)
    assert IDFusionAdapter.load(apath).layers == adapter.layers


@pytest.mark.skipif(not HOOKS, reason="needs ComfyUI's attention override hooks (0.3.75)")
def test_wrong_family_and_bad_block_weights_get_clear_errors(flux, vae):
    sd15 = random_models.build_small_model("SD15", seed=1)
    with torch.inference_mode():
        unet_adapter = IDFusionAdapter.fresh(sd15, init="random", seed=0)
        flux_adapter = patch_flux.fresh_adapter(flux, init="zeros")
        ident = patch_flux.encode_identity(flux, vae, images(1), name="ann")
    with pytest.raises(AdapterError, match=r"made for SD15 \(a UNet, 16 attn2 layers\) but the model is Flux \(a Flux DiT, 4 blocks\)"):
        apply_nodes.IDFusionApply().apply(flux, unet_adapter, ident, **COMMON)
    with pytest.raises(AdapterError, match=r"Adapter was made for Flux \(4 layers\) but the model is SD15"):
        apply_nodes.IDFusionApply().apply(sd15, flux_adapter, ident, **COMMON)
    deeper = random_flux.build_small_flux("dev", seed=4, depth_single_blocks=3)
    with pytest.raises(AdapterError, match=r"with 2 double \+ 2 single blocks.*but the model is Flux with 2 double \+ 3 single"):
        apply_nodes.IDFusionApply().apply(deeper, flux_adapter, ident, **COMMON)
    with pytest.raises(ValueError, match=r"this model has no input blocks.*groups double, single"):
        apply_nodes.IDFusionApply().apply(flux, flux_adapter, ident, **COMMON, block_weights="input:1")
    with pytest.raises(ValueError, match=r"out of range: this model has 4 blocks, indices 0-3"):
        apply_nodes.IDFusionApply().apply(flux, flux_adapter, ident, **COMMON, block_weights="4:1")


@pytest.mark.skipif(HOOKS, reason="this host has the hooks; the message is for older ComfyUI (0.3.52)")
def test_old_comfyui_says_which_version_flux_needs(vae):
    """0.3.52 lacks the attention override and Flux's block names: each Flux entry point says so, without crashing."""
    with torch.inference_mode():
        flux = random_flux.build_small_flux("dev", seed=3)
    msg = r"IDFusion on Flux needs ComfyUI 0\.3\.75 or newer: this ComfyUI \(0\.3\.52\) lacks"
    with pytest.raises(AdapterError, match=msg):
        adapter_nodes.IDFusionNewAdapter().create(flux, "random", 1)
    with pytest.raises(AdapterError, match=msg):
        identity_nodes.IDFusionEncodeReference().encode(flux, vae, images(1), 0, "ann")
    layers = patch_flux.find_layers(flux.model.diffusion_model)
    adapter = IDFusionAdapter(layers, "Flux")
    ident = Identity(layers, "Flux", {"mode": "cached", "timestep": 0, "text": "zeros"}, [None],
                     [torch.zeros(1, 16, 4, 4)], torch.zeros(1, 1, 48), torch.zeros(1, 32), "ann")
    with pytest.raises(ValueError, match=msg):
        apply_nodes.IDFusionApply().apply(flux, adapter, ident, **COMMON)


def test_encode_refuses_a_reference_beyond_the_pass_bound_like_the_unet_path(flux, vae, monkeypatch):
    """A Flux reference above 1024 px (a latent of more than 128x128 positions) is refused at Encode, as on the UNet
    families, so every identity Encode makes can be saved and loaded again (issue 18's bound); and refused from the
    image size, before the VAE encodes (and allocates) anything."""
    if not HOOKS:
        pytest.skip("this host has no Flux path")

    def encode(*args, **kwargs):
        raise AssertionError("the VAE encoded an oversized reference before it was refused")
    monkeypatch.setattr(vae, "encode", encode)   # the real VAE, told to fail if it is asked to encode
    with torch.inference_mode(), pytest.raises(AdapterError, match=r"more than the 16384 positions \(128x128\)"):
        patch_flux.encode_identity(flux, vae, images(1, size=1040), name="big")
