"""IDFusion on ComfyUI's Flux DiT (comfy.ldm.flux.model.Flux), in process on the real ComfyUI:

- the fused joint attention of every double and single block matches a float64 implementation written here
  (explicit softmax, own RMSNorm and RoPE), with several references, Eq. 7 masks, batch 1 and 2, CFG, per-block
  weights, the token budget and ComfyUI's ReferenceLatent tokens in the sequence;
- another pack's attention override and dit block replace keep working in either install order;
- h_f is what the blocks see (LayerNorm of their image tokens), recorded through patches_replace["dit"];
- Flux dev, schnell and Flux 2 (same class) all take it; the input MODEL is never changed."""
import math

import numpy as np
import pytest
import torch

import random_flux
from random_models import sampler_transformer_options
from idfusion_pack.idfusion import patch_flux
from idfusion_pack.idfusion.identity import Identity
from idfusion_pack.idfusion.patch import Entry

pytestmark = pytest.mark.skipif(patch_flux.missing_hooks() is not None, reason="needs the attention override hooks")

OVERRIDE = "optimized_attention_override"
LATENT = (10, 12)      # latent h x w: a 5 x 6 token grid
N_TXT = 7


@pytest.fixture(scope="module")
def flux64():
    """A narrow Flux dev in float64, with random (not unit) QK-norm scales so the key norm is really exercised."""
    mp = random_flux.build_small_flux("dev", seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in mp.model.diffusion_model.named_parameters():
            if name.endswith("norm.scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))
    return mp


def random_identity(mp, refs=1, grids=((4, 6),), seed=0, name="id"):
    """An Identity whose references have latents of the given sizes and random h_f on their token grids."""
    g = torch.Generator().manual_seed(seed)
    dm = mp.model.diffusion_model
    layers = patch_flux.find_layers(dm)
    grids = list(grids) * refs if len(grids) == 1 else list(grids)
    lat = [torch.randn(1, 16, h, w, generator=g) for h, w in grids[:refs]]
    h_f = [{l.name: torch.randn(((h + 1) // 2) * ((w + 1) // 2), l.channels, generator=g) for l in layers}
           for h, w in grids[:refs]]
    return Identity(layers, "Flux", {"mode": "cached", "timestep": 0, "text": "zeros"}, h_f, lat,
                    torch.zeros(1, 1, dm.params.context_in_dim), torch.zeros(1, dm.params.vec_in_dim), name)


class Recorder:
    """An outermost attention override: records, per block, the q/k/v the block computed and the final output."""

    def __init__(self, previous):
        self.previous, self.seen = previous, {}

    def __call__(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous else func(*args, **kwargs)
        to = kwargs["transformer_options"]
        self.seen[(to["block_type"], to["block_index"])] = [t.detach().clone() for t in args[:3]] + [out.detach().clone()]
        return out


class OtherPackOverride:
    """Another pack's override that chains what it found: scales double-block attention outputs by 1.25."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous else func(*args, **kwargs)
        return out * 1.25 if kwargs["transformer_options"].get("block_type") == "double" else out


def with_override(mp, make):
    m = mp.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[OVERRIDE] = make(to.get(OVERRIDE))
    return m


def with_block_replace(mp, calls):
    """Another pack's dit block replace on double block 1: runs the block, then damps its image stream."""
    def replace(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return {"img": out["img"] * 0.9, "txt": out["txt"]}
    m = mp.clone()
    m.set_model_patch_replace(replace, "dit", "double_block", 1)
    return m


def run(mp, x, context, cond_or_uncond, ref_latents=None, attention_mask=None):
    """One DiT evaluation with the model's transformer_options as ComfyUI's sampler builds them; returns the
    Recorder's per-block captures and the output."""
    rec_model = with_override(mp, Recorder)
    rec = rec_model.model_options["transformer_options"][OVERRIDE]
    to = sampler_transformer_options(rec_model, cond_or_uncond)
    b = x.shape[0]
    kw = {"y": torch.linspace(-1, 1, b * 32, dtype=torch.float64).reshape(b, 32), "guidance": torch.full((b,), 3.5)}
    if ref_latents is not None:
        kw["ref_latents"] = ref_latents
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    with torch.no_grad():
        out = mp.model.apply_model(x, torch.full((b,), 0.6, dtype=torch.float64), c_crossattn=context,
                                   transformer_options=to, **kw)
    return rec.seen, out


# ---- the float64 reference ------------------------------------------------------------------------------------
def rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def rope(x, pos, axes, theta):
    """Flux's RoPE written out: per axis i (axes[i] dims), pair (2j, 2j+1) rotated by pos_i * theta^(-2j/axes[i])."""
    out = x.copy()
    start = 0
    for i, d in enumerate(axes):
        for j in range(d // 2):
            ang = pos[:, i] * theta ** (-2.0 * j / d)
            c, s = np.cos(ang), np.sin(ang)
            a, b = x[..., start + 2 * j], x[..., start + 2 * j + 1]
            out[..., start + 2 * j] = c * a - s * b
            out[..., start + 2 * j + 1] = s * a + c * b
        start += d
    return out


def region_inside(mask, h, w):
    m = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float64)[None, None], (h, w))[0, 0].flatten().numpy()
    inside = m > 0.5
    if not inside.any() and (m > 0).any():
        inside = m == m.max()
    return inside


def identity_keys(dm, layer, ident, weight, pooled):
    """K_f (heads, N_f, dh) and V_f of one identity at one block, float64: Eq. 2, then the block's key RMSNorm and
    RoPE at t = -1 for every reference, the reference's own grid (pooled: 2x2 cell centres)."""
    kind, i, _ = layer.key
    norm = (dm.double_blocks[i].img_attn.norm.key_norm if kind == "double" else dm.single_blocks[i].norm.key_norm)
    scale = norm.scale.detach().double().numpy()
    H, dh = layer.heads, layer.inner // layer.heads
    Ks, Vs = [], []
    for h_f, lat in zip(ident.h_f, ident.latents):
        hf = h_f[layer.name].double()
        gh, gw = (lat.shape[-2] + 1) // 2, (lat.shape[-1] + 1) // 2
        ys, xs = np.arange(gh, dtype=float), np.arange(gw, dtype=float)
        if pooled:
            hf = torch.nn.functional.avg_pool2d(hf.reshape(1, gh, gw, -1).permute(0, 3, 1, 2), 2, ceil_mode=True)
            hf = hf.permute(0, 2, 3, 1).reshape(-1, hf.shape[1])
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
            ys, xs = np.arange(gh) * 2 + 0.5, np.arange(gw) * 2 + 0.5
        hf = hf.numpy()
        pos = np.stack([np.full(gh * gw, -1.0), np.repeat(ys, gw), np.tile(xs, gh)], axis=1)
        wk, wv = (w.detach().double().numpy() for w in patch_flux_adapter_weights(layer))
        K = (hf @ wk.T).reshape(-1, H, dh).transpose(1, 0, 2)
        V = weight * (hf @ wv.T).reshape(-1, H, dh).transpose(1, 0, 2)
        Ks.append(rope(rms(K, scale), pos, dm.params.axes_dim, dm.params.theta))
        Vs.append(V)
    return np.concatenate(Ks, 1), np.concatenate(Vs, 1)


_ADAPTER = {}


def patch_flux_adapter_weights(layer):
    return _ADAPTER["adapter"].weights(layer)


def block_reference(q, k, v, rows_fused, dm, layer, identities, regions, weight, n_img, n_extra, grid, pooled,
                    model_mask=None):
    """The whole block attention in float64. q/k/v (b, H, N, dh) as the block computed them (RoPE applied).
    Image queries of fused rows attend to [K; K_f...] with Eq. 7; every other query to K. Returns (b, N, H*dh)."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    b, H, N, dh = q.shape
    i1 = N - n_extra
    i0 = i1 - n_img
    kv = [identity_keys(dm, layer, ident, weight, pooled) for ident in identities]
    owner = np.concatenate([np.full(K.shape[1], j) for j, (K, _) in enumerate(kv)]) if kv else np.zeros(0, int)
    inside = None
    if any(r is not None for r in regions):
        inside = [region_inside(r, *grid) if r is not None else np.zeros(grid[0] * grid[1], bool) for r in regions]
    out = np.zeros((b, N, H * dh))
    for row in range(b):
        for hd in range(H):
            for qi in range(N):
                keys, vals, logit_mask = k[row, hd], v[row, hd], np.zeros(N)
                if model_mask is not None:                 # the model's own mask, on the block's keys only
                    logit_mask = np.where(model_mask[row, qi], 0.0, -np.inf)
                if rows_fused[row] and i0 <= qi < i1 and kv:
                    keys = np.concatenate([keys] + [K[hd] for K, _ in kv])
                    vals = np.concatenate([vals] + [V[hd] for _, V in kv])
                    extra = np.zeros(len(owner))
                    if inside is not None:                 # Eq. 7: hidden inside another identity's region
                        for key, i in enumerate(owner):
                            if any(inside[j][qi - i0] for j in range(len(identities)) if j != i):
                                extra[key] = -np.inf
                    logit_mask = np.concatenate([logit_mask, extra])
                logits = logit_mask + keys @ q[row, hd, qi] / math.sqrt(dh)
                p = np.exp(logits - logits.max())
                out[row, qi, hd * dh:(hd + 1) * dh] = (p / p.sum()) @ vals
    return out


def check_all_blocks(seen, mp, adapter, identities, regions, weight, rows_fused, n_extra=0, pooled=False,
                     block_weights=None, scale_double=1.0, model_mask=None):
    dm = mp.model.diffusion_model
    _ADAPTER["adapter"] = adapter
    grid = ((LATENT[0] + 1) // 2, (LATENT[1] + 1) // 2)
    assert set(seen) == {(l.key[0], l.key[1]) for l in adapter.layers}
    worst = 0.0
    for layer in adapter.layers:
        q, k, v, got = seen[(layer.key[0], layer.key[1])]
        w = weight * (block_weights or {}).get(layer.name, 1.0)
        fused = [r and w != 0 for r in rows_fused]
        ref = block_reference(q, k, v, fused, dm, layer, identities, regions, w, grid[0] * grid[1], n_extra, grid, pooled,
                              model_mask)
        if layer.key[0] == "double":
            ref = ref * scale_double
        rel = np.abs(got.numpy() - ref).max() / np.abs(ref).max()
        worst = max(worst, rel)
        assert rel < 1e-5, f"block {layer.key}: max relative error {rel:.2e}"
    return worst


def region(kind, H=80, W=96):
    m = torch.zeros(H, W)
    if kind == "left":
        m[:, : W // 2] = 1
    elif kind == "right":
        m[:, W // 2 + 8:] = 1
    elif kind == "top":
        m[: H // 3, W // 4: 3 * W // 4] = 1
    return m


CASES = {
    "batch 1, 1 reference": dict(refs=[(1, None)], batch=1, cfg=[0], weight=1.0),
    "batch 2, CFG, 2 references": dict(refs=[(2, None)], batch=2, cfg=[1, 0], weight=0.7),
    "batch 2, CFG, 3 identities with masks": dict(refs=[(1, "left"), (2, "right"), (1, "top")], batch=2, cfg=[1, 0],
                                                  weight=1.0),
    "batch 1, CFG identity too, masks, pooled, per-block weights": dict(
        refs=[(1, "left"), (1, "right")], batch=1, cfg=[1, 0], weight=1.2, uncond=True, pooled=True,
        block_weights={"double_1_0": 0.0, "single_0_0": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_joint_attention_matches_float64_at_every_block(flux64, case):
    spec = CASES[case]
    adapter = patch_flux.fresh_adapter(flux64, init="random", seed=3)
    ids = [random_identity(flux64, refs=r, grids=((4, 6), (6, 4)) if r == 2 else ((4, 6),), seed=10 + n, name=f"id{n}")
           for n, (r, _) in enumerate(spec["refs"])]
    regions = [region(kind) if kind else None for _, kind in spec["refs"]]
    f = patch_flux.FluxFusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)], weight=spec["weight"],
                              uncond=spec.get("uncond", False), reference_tokens="pooled" if spec.get("pooled") else "all",
                              layer_weights=spec.get("block_weights"))
    patched = patch_flux.install(flux64, f)
    assert patch_flux.ours(flux64) == [] and OVERRIDE not in flux64.model_options.get("transformer_options", {})

    g = torch.Generator().manual_seed(4)
    b = spec["batch"] * len(spec["cfg"])
    x = torch.randn(b, 16, *LATENT, generator=g, dtype=torch.float64)
    context = torch.randn(b, N_TXT, 48, generator=g, dtype=torch.float64)
    seen, out = run(patched, x, context, spec["cfg"])
    rows = [c == 0 or spec.get("uncond", False) for c in spec["cfg"] for _ in range(spec["batch"])]
    worst = check_all_blocks(seen, flux64, adapter, ids, regions, spec["weight"], rows, pooled=spec.get("pooled", False),
                             block_weights=spec.get("block_weights"))
    print(f"{case}: worst relative error {worst:.2e}")
    # the identity really changes the fused rows, and leaves text-only rows bit-identical to the plain model
    plain, plain_out = run(flux64, x, context, spec["cfg"])
    first = seen[("double", 0)][3]
    for r, fused in enumerate(rows):
        same = torch.equal(plain[("double", 0)][3][r], first[r])
        assert same != fused, f"row {r}: fused={fused} but the block output {'did not change' if same else 'changed'}"
    if spec.get("block_weights", {}).get("double_1_0") == 0.0:  # weight 0 at a block: exactly the plain attention
        assert torch.equal(seen[("double", 1)][3], run_plain_block_input(flux64, seen, "double", 1))


def run_plain_block_input(mp, seen, kind, i):
    """The plain attention of a block on the q/k/v it received (what weight 0 must give exactly)."""
    from comfy.ldm.modules.attention import optimized_attention
    q, k, v, _ = seen[(kind, i)]
    return optimized_attention(q, k, v, q.shape[1], skip_reshape=True)


@pytest.mark.parametrize("order", ["other pack first", "IDFusion first"])
def test_chained_with_other_override_block_replace_and_reference_latent(flux64, order):
    """Another pack's attention override and dit block replace on the same model, installed before or after IDFusion,
    with ReferenceLatent tokens in the sequence: every block still matches float64 (the other override's scaling
    included), the block replace runs, and ReferenceLatent's tokens attend as without IDFusion."""
    adapter = patch_flux.fresh_adapter(flux64, init="random", seed=5)
    ids = [random_identity(flux64, seed=20, name="a"), random_identity(flux64, seed=21, name="b")]
    regions = [region("left"), region("right")]
    f = patch_flux.FluxFusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)], weight=1.0)
    calls = []
    if order == "other pack first":
        m = patch_flux.install(with_block_replace(with_override(flux64, OtherPackOverride), calls), f)
        assert isinstance(m.model_options["transformer_options"][OVERRIDE].previous, OtherPackOverride)
    else:
        m = with_block_replace(with_override(patch_flux.install(flux64, f), OtherPackOverride), calls)
        assert isinstance(m.model_options["transformer_options"][OVERRIDE].previous, patch_flux.JointAttention)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 16, *LATENT, generator=g, dtype=torch.float64)
    context = torch.randn(4, N_TXT, 48, generator=g, dtype=torch.float64)
    kontext = [torch.randn(1, 16, 6, 8, generator=g, dtype=torch.float64).expand(4, -1, -1, -1)]  # ReferenceLatent, batched
    seen, out = run(m, x, context, [1, 0], ref_latents=kontext)
    assert calls, "the other pack's block replace did not run"
    check_all_blocks(seen, flux64, adapter, ids, regions, 1.0, [False, False, True, True], n_extra=12, scale_double=1.25)
    # the same graph without IDFusion differs only through the identity
    seen_other, _ = run(with_block_replace(with_override(flux64, OtherPackOverride), []), x, context, [1, 0],
                        ref_latents=kontext)
    assert torch.equal(seen_other[("double", 0)][3][:2], seen[("double", 0)][3][:2])


def test_models_own_attention_mask_is_kept_on_the_blocks_keys(flux64):
    """A Flux attention mask (additive: BaseModel.apply_model casts every cond tensor to the model dtype, so a boolean
    one arrives as 0/1 floats) keeps acting on the block's own keys for every query; the identity keys are added for
    the image queries, with Eq. 7 on top."""
    adapter = patch_flux.fresh_adapter(flux64, init="random", seed=6)
    ids = [random_identity(flux64, seed=30, name="a"), random_identity(flux64, seed=31, name="b")]
    regions = [region("left"), region("top")]
    m = patch_flux.install(flux64, patch_flux.FluxFusion(adapter, [Entry(i, r) for i, r in zip(ids, regions)]))
    g = torch.Generator().manual_seed(9)
    n = N_TXT + (LATENT[0] // 2) * (LATENT[1] // 2)
    allow = torch.rand(4, n, n, generator=g) > 0.3
    allow |= torch.eye(n, dtype=torch.bool)                      # every query keeps a key
    mask = torch.zeros(4, n, n, dtype=torch.float64).masked_fill(~allow, float("-inf"))
    x = torch.randn(4, 16, *LATENT, generator=g, dtype=torch.float64)
    context = torch.randn(4, N_TXT, 48, generator=g, dtype=torch.float64)
    seen, _ = run(m, x, context, [1, 0], attention_mask=mask)
    check_all_blocks(seen, flux64, adapter, ids, regions, 1.0, [False, False, True, True], model_mask=allow.numpy())


def test_h_f_is_layer_norm_of_the_blocks_image_tokens(flux64):
    """The reference pass records, per block, LayerNorm of the image tokens entering it (single blocks: after the
    text tokens), computed here with a dit block replace of the test's own."""
    dm = flux64.model.diffusion_model
    layers = patch_flux.find_layers(dm)
    lat = torch.randn(1, 16, 6, 7, dtype=torch.float64)
    ctx, y, _ = patch_flux.text_condition(flux64)
    sigma = patch_flux.reference_sigma(flux64, 0)
    got = patch_flux.reference_h_f(flux64, layers, lat, sigma, ctx.double(), y.double())
    seen = {}

    def grab(kind, i):
        def replace(args, extra):
            img = args["img"] if kind == "double" else args["img"][:, 1:]
            seen[f"{kind}_{i}_0"] = torch.nn.functional.layer_norm(img.clone(), (img.shape[-1],), eps=1e-6)
            return extra["original_block"](args)
        return replace
    blocks = {(f"{l.key[0]}_block", l.key[1]): grab(l.key[0], l.key[1]) for l in layers}
    with torch.no_grad():
        flux64.model.apply_model(lat, sigma.double(), c_crossattn=ctx.double(), y=y.double(),
                                 guidance=torch.full((1,), patch_flux.REFERENCE_GUIDANCE),
                                 transformer_options={"patches_replace": {"dit": blocks}})
    assert set(got) == set(seen)
    assert float(sigma) == 0.0  # timestep 0: the clean reference
    for k in got:
        assert got[k].shape == (3 * 4, 64)
        torch.testing.assert_close(got[k].double(), seen[k][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["schnell", "flux2"])
def test_other_flux_kinds_take_the_identity(kind):
    """Flux schnell and Flux 2 (ComfyUI builds both with comfy.ldm.flux.model.Flux) take an identity end to end:
    reference pass, install, a changed output on the cond rows only."""
    mp = random_flux.build_small_flux(kind, seed=2)
    dm = mp.model.diffusion_model
    layers = patch_flux.find_layers(dm)
    adapter = patch_flux.fresh_adapter(mp, init="random", seed=1)
    ctx, y, _ = patch_flux.text_condition(mp)
    lat = torch.randn(1, 16, 6, 6)
    h_f = patch_flux.reference_h_f(mp, layers, lat, patch_flux.reference_sigma(mp, 0), ctx, y)
    ident = Identity(layers, type(mp.model.model_config).__name__, {"mode": "cached", "timestep": 0, "text": "zeros"},
                     [h_f], [lat], ctx, y, "x")
    patched = patch_flux.install(mp, patch_flux.FluxFusion(adapter, [Entry(ident)]))
    x = torch.randn(2, 16, 8, 8)
    c = torch.randn(2, 5, dm.params.context_in_dim)
    outs = []
    for m in (mp, patched):
        to = sampler_transformer_options(m, [1, 0])
        kw = {"guidance": torch.full((2,), 3.5)} if dm.params.guidance_embed else {}
        if dm.params.vec_in_dim:
            kw["y"] = torch.zeros(2, dm.params.vec_in_dim)
        with torch.no_grad():
            outs.append(m.model.apply_model(x, torch.full((2,), 0.5), c_crossattn=c, transformer_options=to, **kw))
    assert torch.equal(outs[0][0], outs[1][0])          # uncond row: text only
    assert not torch.allclose(outs[0][1], outs[1][1])    # cond row: the identity acts
    assert torch.isfinite(outs[1]).all()


def test_per_step_mode_encodes_the_reference_at_the_step_sigma(flux64):
    """per_step: h_f comes from a reference pass at the current sigma (not the cached one): the result differs from
    cached mode, is finite, and the cached-mode K_f cache stays empty."""
    adapter = patch_flux.fresh_adapter(flux64, init="random", seed=3)
    layers = patch_flux.find_layers(flux64.model.diffusion_model)
    ctx, y, _ = patch_flux.text_condition(flux64)
    lat = torch.randn(1, 16, 4, 6)
    h_f = patch_flux.reference_h_f(flux64, layers, lat.double(), patch_flux.reference_sigma(flux64, 0), ctx.double(), y.double())
    ident = Identity(layers, "Flux", {"mode": "cached", "timestep": 0, "text": "zeros"}, [h_f], [lat], ctx, y, "p")
    x = torch.randn(1, 16, *LATENT, dtype=torch.float64)
    c = torch.randn(1, N_TXT, 48, dtype=torch.float64)
    outs = {}
    for mode in ("cached", "per_step"):
        f = patch_flux.FluxFusion(adapter, [Entry(ident)], mode=mode)
        _, outs[mode] = run(patch_flux.install(flux64, f), x, c, [0])
        if mode == "per_step":
            assert not f._heads and not f._kv
    assert torch.isfinite(outs["per_step"]).all()
    assert not torch.allclose(outs["cached"], outs["per_step"])
