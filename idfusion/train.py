"""Training core for the adapter (paper section 4.1): only Linear_kf / Linear_vf train; the diffusion model, VAE and
text encoder are frozen. One core serves the ComfyUI training node (nodes/train_nodes.py) and the command line
(scripts/train.py, which runs on CPU, one GPU, or many under torchrun with DDP), for both model families: what
differs per family (the reference pass, the fused attention of the training forward, the noise schedule's time
axis, the target's extra inputs) comes from the family's glue (families.glue_for); the UNet's pieces are below
(TrainPatch, checkpointed), the Flux DiT's in patch_flux.py.

Objective: the model's own target (eps, v, or a flow model's velocity) on the target image, with the reference
encoded exactly as at inference (the glue's run_reference_pass, the encoding convention written into the adapter's
metadata).
Options: reference dropout, masked diffusion loss on the face (FaceSnap Eq. 3), class-guided denoising
regularisation outside the face (Face2Diffusion Eqs. 5-7), cached or per-step reference encoding.

Every random draw comes from a generator seeded by (seed, step, global row), so a resumed run, and a DDP run
that splits the same global batch across processes, repeat an uninterrupted single-process run.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fusion
from .adapter import AdapterError, IDFusionAdapter, read_safetensors, save_safetensors_atomic

log = logging.getLogger("IDFusion")
STATE_FORMAT = "idfusion.train_state"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1               # global batch: split evenly across DDP processes
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_decay_steps: int = 0           # the last N of `steps` fall from lr to zero on a half cosine (0: constant)
    save_every: int = 100
    seed: int = 0
    init: str = "attn1"               # zeros | attn1 | random (a fresh adapter)
    reference: str = "other image"    # other image (same identity folder) | same image (own face crop)
    reference_dropout: float = 0.1    # rows trained without identity keys, so CFG can amplify the identity
    face_loss_weight: float = 0.0     # FaceSnap Eq. 3: loss weight (1 + w * face mask)
    cgdr_weight: float = 0.0          # Face2Diffusion: outside the face, follow the class prompt's prediction
    class_prompt: str = "a photo of a person"
    encoding: str = "cached"          # cached (clean reference at `timestep`) | per_step (noised to the target's sigma)
    timestep: int = 0
    reference_text: str = "zeros"     # zeros | empty (CLIP's empty prompt): the reference pass's text
    mixed_precision: str = "auto"     # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = True  # recompute the frozen UNet's block activations in backward instead of storing them
    reference_tokens: str = "all"     # all | pooled: 2x2-pooled h_f at the highest-resolution layers, as Apply's option
    # reference augmentation (the reference only; the target picture is never changed), so the identity does not
    # hang on where the face sits, on clean pixels or on the background behind it
    reference_shift: float = 0.0      # moved by up to this fraction of its side, edge pixels repeated (0-0.5)
    reference_noise: float = 0.0      # Gaussian pixel noise of this sd, 0-255 units (0-100)
    reference_background: float = 0.0  # chance the background (outside its *_mask) becomes a random colour (0-1)

    def augmentation(self) -> dict:
        return {"shift": self.reference_shift, "noise": self.reference_noise, "background": self.reference_background}

    def encoding_meta(self) -> dict:
        return {"mode": self.encoding, "timestep": self.timestep, "text": self.reference_text}


class TrainPatch:
    """attn2 replace used in training: per-row h_f and K_f/V_f with gradients (Eqs. 2-5), no caches. Rows whose
    reference was dropped see the text keys only, exactly like the uncond branch at inference."""

    def __init__(self, adapter: IDFusionAdapter, layer):
        self.adapter, self.layer = adapter, layer

    def __call__(self, q, k, v, extra):
        st = extra["idfusion_train"]
        h_f = st["h_f"][self.layer.key].to(q.dtype)                      # (b, N_f, C)
        wk, wv = (w.to(q.dtype) for w in self.adapter.weights(self.layer))
        K_f, V_f = fusion.project(h_f, wk, wv)                           # (b, N_f, D)
        K, V = torch.cat([k, K_f], dim=1), torch.cat([v, V_f], dim=1)    # Eq. 3
        allow = torch.ones(q.shape[0], 1, K.shape[1], dtype=torch.bool, device=q.device)
        allow[:, 0, k.shape[1]:] = st["keep"][:, None]
        return fusion.masked_attention(q, K, V, extra["n_heads"], allow)


def unet_train_options(adapter: IDFusionAdapter, base_model, pooled: set):
    """The UNet glue's training forward: transformer_options with a TrainPatch at every attn2 layer."""
    patches = {l.key: TrainPatch(adapter, l) for l in adapter.layers}

    def options(h_f, keep, x_t, ref_hw):
        return {"patches_replace": {"attn2": patches}, "idfusion_train": {"h_f": h_f, "keep": keep}}
    return options


def unet_train_sigma(model_sampling, t: torch.Tensor) -> torch.Tensor:
    return model_sampling.sigma(t)   # discrete schedules: an integer timestep 0..999


def unet_target_kwargs(base_model, ref_y, caption_y, batch: int, device) -> dict:
    """SDXL-style ADM: the target gets the reference pass's y (zeros, or the empty prompt's); SD1.5 none."""
    return {"y": ref_y.to(device).expand(batch, -1)} if ref_y is not None else {}


def unet_trainable(model_patcher, gradient_checkpointing: bool = True):
    return checkpointed(model_patcher) if gradient_checkpointing else model_patcher


class AdapterStep(nn.Module):
    """The module DDP wraps: its only parameters are the adapter's; the frozen model is called inside, not
    registered, so DDP synchronises exactly Linear_kf / Linear_vf. `options` is the glue's training forward:
    (h_f, keep, x_t, reference latent size) -> transformer_options."""

    def __init__(self, adapter: IDFusionAdapter, base_model, options):
        super().__init__()
        self.adapter = adapter
        self._frozen = [base_model]
        self._options = options

    def forward(self, x_t, sigma, context, h_f, keep, ref_hw, **extra):
        to = self._options(h_f, keep, x_t, ref_hw)
        return self._frozen[0].apply_model(x_t, sigma, c_crossattn=context, transformer_options=to, **extra)


def checkpointed(model_patcher):
    """A clone whose UNet ResBlocks and transformer blocks run under gradient checkpointing (torch.utils.checkpoint,
    non-reentrant), set through ModelPatcher object patches so the model is restored when it is unpatched.
    Only the adapter has gradients, but backward still runs through every later block: without this, all their
    activations stay alive until backward."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    from torch.utils.checkpoint import checkpoint
    patched = model_patcher.clone()

    def wrap(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():  # reference pass, CGDR target, inference: nothing to save
                return forward(*args, **kwargs)
            # the UNet rewrites transformer_options["block"/"block_index"] as it goes; the recompute in backward must
            # see the values of this call, so freeze a shallow copy
            args = [dict(a) if isinstance(a, dict) else a for a in args]
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for name, m in patched.model.diffusion_model.named_modules():
        if isinstance(m, (BasicTransformerBlock, ResBlock)):  # the class's forward: never wrap a wrapper twice
            patched.add_object_patch(f"diffusion_model.{name}.forward", wrap(type(m).forward.__get__(m)))
    return patched


def training_mode(fn):
    """Run fn with autograd on. ComfyUI executes every node under torch.inference_mode() (execution.py), where
    nothing records gradients; its own trainer (comfy_extras/nodes_train.py) leaves it the same way. Tensors read or
    made here (optimizer state, cached latents, captions) are then normal tensors that autograd may save."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return run


def _normal_weights(module: nn.Module) -> int:
    """Replace inference-tensor parameters and buffers by normal copies with the same values; returns how many.
    A model loaded inside a ComfyUI node has inference-tensor weights, and autograd refuses to save those for
    backward (the frozen UNet's weights are needed to back-propagate through the blocks after each attn2).
    One tensor at a time, so the peak is one extra tensor, not a second model. Values are unchanged, so the
    MODEL behaves the same everywhere else; a later ModelPatcher unpatch still restores its own backups."""
    n = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
                n += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()
                n += 1
    return n


def _loss_weight(model_sampling, sigma):
    """x0-space squared error times this equals the model's own loss, from the prediction type's calculate_denoised
    (comfy/model_sampling.py), with x0_hat - x0 = c * (target - output):
    - EPS: x0_hat = x_t - sigma * eps_hat, c = sigma: 1/sigma^2;
    - V_PREDICTION (and EDM): c = sigma * sd / sqrt(sigma^2 + sd^2): (sigma^2 + sd^2) / (sigma^2 sd^2);
    - CONST (flow models: Flux, SD3): x_t = sigma * noise + (1 - sigma) * x0 and x0_hat = x_t - sigma * v_hat, so
      x0_hat - x0 = sigma * ((noise - x0) - v_hat): 1/sigma^2 gives the flow-matching velocity loss;
    - X0 (the pack's synthetic_faces model predicts x0 itself): 1.
    Any other prediction type is refused rather than trained with a wrong objective."""
    import comfy.model_sampling as ms
    sd = getattr(model_sampling, "sigma_data", 1.0)
    if isinstance(model_sampling, ms.X0):
        return torch.ones_like(sigma)
    if isinstance(model_sampling, ms.V_PREDICTION):
        return (sigma ** 2 + sd ** 2) / (sigma ** 2 * sd ** 2)
    if isinstance(model_sampling, (ms.EPS, ms.CONST)):
        return 1.0 / sigma ** 2
    raise AdapterError(f"IDFusion training does not know this model's prediction type ({type(model_sampling).__name__}); "
                       f"it trains eps, v, x0 and flow (CONST) models.")


def lr_factor(step: int, config: TrainConfig) -> float:
    """The LR multiplier at `step`: linear warm-up, then constant, then (lr_decay_steps > 0) a half cosine to zero
    over the last lr_decay_steps. A function of the step and the config only, so a resumed run repeats it."""
    warm = max(config.warmup_steps, 0)
    f = min(1.0, (step + 1) / warm) if warm else 1.0
    n = config.lr_decay_steps
    if n > 0:
        into = min(max(step - (config.steps - n), 0), n) / n
        f *= 0.5 * (1.0 + math.cos(math.pi * into))
    return f


def _row_generator(seed: int, step: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + row) % (2 ** 63))


class Trainer:
    @training_mode
    def __init__(self, model_patcher, clip, vae, dataset, out_dir: str, name: str, config: TrainConfig,
                 adapter: IDFusionAdapter | None = None):
        import torch.distributed as dist
        self.model, self.clip, self.vae, self.ds = model_patcher, clip, vae, dataset
        self.out_dir, self.name, self.cfg = out_dir, name, config
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes.")
        for name, top in (("reference_shift", 0.5), ("reference_noise", 100.0), ("reference_background", 1.0)):
            v = getattr(config, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= top):   # NaN fails both comparisons
                raise ValueError(f"{name} is {v!r}: use a number from 0 to {top:g}.")
        if not (isinstance(config.lr_decay_steps, int) and 0 <= config.lr_decay_steps <= config.steps):
            raise ValueError(f"lr_decay_steps is {config.lr_decay_steps!r}: use a whole number from 0 to steps "
                             f"({config.steps}).")
        import comfy.model_management as mm
        from .families import glue_for
        self.glue = glue = glue_for(model_patcher)
        problem = glue.missing_hooks()
        if problem:  # before anything is loaded or allocated
            raise AdapterError(problem)
        model_patcher = self.model = glue.trainable(model_patcher, config.gradient_checkpointing)
        mm.load_models_gpu([model_patcher])
        self.base = model_patcher.model
        self.device = model_patcher.load_device
        _normal_weights(self.base)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapter = adapter or glue.fresh_adapter(model_patcher, init=config.init, seed=config.seed,
                                                     encoding=config.encoding_meta())
        glue.check_adapter(self.adapter, model_patcher)
        self.adapter.encoding = config.encoding_meta()
        self.adapter.to(self.device)
        if config.reference_tokens not in ("all", "pooled"):
            raise ValueError(f"reference_tokens is {config.reference_tokens!r}: use 'all' or 'pooled'.")
        # the token budget trained as Apply uses it: the narrowest (highest-resolution) layers see pooled h_f
        narrowest = min(l.channels for l in self.adapter.layers)
        self._pooled = ({l.key for l in self.adapter.layers if l.channels == narrowest}
                        if config.reference_tokens == "pooled" else set())
        self.step_module = AdapterStep(self.adapter, self.base, glue.train_options(self.adapter, self.base, self._pooled))
        self.ddp = self.step_module
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, config))
        self.step, self.losses = 0, []
        self.ref_context, self.ref_y, text = glue.text_condition(model_patcher, clip if config.reference_text == "empty" else None)
        self._captions, self._latents = {}, {}
        self._perm = (-1, None)  # (epoch, permutation of the dataset) for _index
        self.ms = self.base.model_sampling
        _loss_weight(self.ms, torch.ones(1))  # an unknown prediction type is refused here, not after a step

    # ---- files -------------------------------------------------------------------------------
    @property
    def adapter_path(self):
        return os.path.join(self.out_dir, f"{self.name}.safetensors")

    @property
    def state_path(self):
        return os.path.join(self.out_dir, f"{self.name}.train-state.safetensors")

    def save(self):
        if self.rank != 0:
            return
        self.adapter.save(self.adapter_path)
        tensors = {f"adapter.{k}": v for k, v in self.adapter.state_tensors().items()}
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"format": STATE_FORMAT, "format_version": "1", "step": str(self.step), "config": json.dumps(asdict(self.cfg)),
                "param_groups": json.dumps(opt["param_groups"]), "scheduler": json.dumps(self.sched.state_dict()),
                "losses": json.dumps(self.losses)}
        save_safetensors_atomic(tensors, self.state_path, meta)
        write_loss_curve(self.losses, os.path.join(self.out_dir, f"{self.name}.loss.png"))

    @training_mode
    def resume(self) -> bool:
        if not os.path.isfile(self.state_path):
            return False
        try:
            self._load_state()
        except AdapterError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:  # RecursionError is a RuntimeError
            raise AdapterError(f"The training state '{os.path.basename(self.state_path)}' is damaged or from another run "
                               f"({type(e).__name__}: {e}). Delete it, or set resume to false, to start over.") from None
        log.info("IDFusion training: resumed '%s' at step %d", self.name, self.step)
        return True

    def _load_state(self):
        tensors, meta = read_safetensors(self.state_path, STATE_FORMAT, "training state")
        with torch.no_grad():
            for k, v in self.adapter.state_tensors().items():
                v.copy_(tensors[f"adapter.{k}"])
        state = {}
        for key, t in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = t.to(self.device) if name != "step" else t
        self.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.sched.load_state_dict(json.loads(meta["scheduler"]))
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.losses = int(meta["step"]), json.loads(meta["losses"])

    # ---- data ----------------------------------------------------------------------------------
    def _index(self, step: int, row: int) -> int:
        """Dataset index of a global row: one seeded permutation per epoch, drawn once, not per row."""
        n = len(self.ds)
        flat = step * self.cfg.batch_size + row
        epoch = flat // n
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)))
        return int(self._perm[1][flat % n])

    def _caption(self, text: str):
        if text not in self._captions:
            if self.clip is None:
                raise ValueError("Training needs a CLIP to encode captions.")
            with torch.no_grad():  # frozen text encoder; cached across steps, so no graph may hang on it
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            self._captions[text] = (cond.detach().float().cpu(), pooled.detach() if pooled is not None else None)
        return self._captions[text]

    @torch.no_grad()
    def _encode(self, image):  # (H, W, 3) -> (1, c, h, w) model-space latent (frozen VAE)
        return self.base.process_latent_in(self.vae.encode(image[None])).float()

    def _batch(self, step: int):
        b = self.cfg.batch_size // self.world
        rows = range(self.rank * b, (self.rank + 1) * b)
        out = {k: [] for k in ("x0", "ctx", "ref", "mask", "t", "noise", "ref_noise", "keep")}
        pooled = []
        for r in rows:
            g = _row_generator(self.cfg.seed, step, r)
            i = self._index(step, r)
            item = self.ds.load(i, g, same_image_reference=self.cfg.reference == "same image",
                                augment=self.cfg.augmentation())
            if i not in self._latents:
                self._latents[i] = self._encode(item["image"]).cpu()
            x0 = self._latents[i]
            out["x0"].append(x0)
            ctx, pool = self._caption(item["caption"])
            out["ctx"].append(ctx)
            pooled.append(pool)
            out["ref"].append(self._encode(item["reference"]).cpu())
            m = item["mask"]
            out["mask"].append(F.interpolate(m[None, None], size=x0.shape[-2:], mode="area") if m is not None else torch.zeros(1, 1, *x0.shape[-2:]))
            out["t"].append(torch.randint(0, 1000, (1,), generator=g).float())
            out["noise"].append(torch.randn(x0.shape, generator=g))
            out["ref_noise"].append(torch.randn(out["ref"][-1].shape, generator=g))
            out["keep"].append(torch.rand(1, generator=g) >= self.cfg.reference_dropout)
        ctx_len = max(c.shape[1] for c in out["ctx"])
        out["ctx"] = [F.pad(c, (0, 0, 0, ctx_len - c.shape[1])) for c in out["ctx"]]
        batch = {k: torch.cat(v).to(self.device) for k, v in out.items()}
        # the captions' pooled text (Flux's vector input); None when the text encoder gives none
        batch["y"] = torch.cat([p[:1].float() for p in pooled]).to(self.device) if all(p is not None for p in pooled) else None
        return batch

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        mp = self.cfg.mixed_precision
        if self.device.type != "cuda" or mp == "fp32" or (mp == "auto" and self.device.type != "cuda"):
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=torch.float16 if mp == "fp16" else torch.bfloat16)

    def token_budget(self, h_f: dict, latent_hw) -> dict:
        """With reference_tokens 'pooled', h_f (b, N_f, C) of the narrowest layers pooled 2x2 on the layer's token
        grid (the reference latent's, halved with ceil once per level), exactly as Apply pools at inference."""
        out = dict(h_f)
        for k in self._pooled & set(h_f):
            H, W = latent_hw
            while H * W > h_f[k].shape[-2]:
                H, W = (H + 1) // 2, (W + 1) // 2
            out[k] = fusion.pool_tokens(h_f[k], H, W)
        return out

    @training_mode
    def train_step(self) -> float:
        _normal_weights(self.base)  # again: a reload onto the device (after the VAE ran) under inference mode makes new ones
        batch = self._batch(self.step)
        sigma = self.glue.train_sigma(self.ms, batch["t"]).to(self.device)
        x_t = self.ms.noise_scaling(sigma, batch["noise"], batch["x0"])
        if self.cfg.encoding == "per_step":
            ref_sigma = sigma
            x_ref = self.ms.noise_scaling(sigma, batch["ref_noise"], batch["ref"])
        else:
            ref_sigma = self.glue.reference_sigma(self.model, self.cfg.timestep).expand(x_t.shape[0]).to(self.device)
            x_ref = batch["ref"]
        b = x_t.shape[0]
        y = self.ref_y.to(self.device).expand(b, -1) if self.ref_y is not None else None  # the reference pass's
        with torch.no_grad(), self._autocast():
            h_f = self.token_budget(self.glue.run_reference_pass(self.base, self.device, x_ref, ref_sigma,
                                                                 self.ref_context, y), x_ref.shape[-2:])
        extra = self.glue.target_kwargs(self.base, self.ref_y, batch["y"], b, self.device)
        with self._autocast():
            denoised = self.ddp(x_t, sigma, batch["ctx"], h_f, batch["keep"], tuple(x_ref.shape[-2:]), **extra)
        w = _loss_weight(self.ms, sigma).view(-1, 1, 1, 1)
        face = batch["mask"]
        err = (denoised.float() - batch["x0"]) ** 2 * w
        loss = (err * (1.0 + self.cfg.face_loss_weight * face)).mean()
        if self.cfg.cgdr_weight > 0:
            cls_ctx, cls_pool = self._caption(self.cfg.class_prompt)
            cls_ctx = cls_ctx.to(self.device).expand(b, -1, -1)
            cls_y = cls_pool[:1].float().expand(b, -1) if cls_pool is not None else None
            with torch.no_grad(), self._autocast():
                kw = self.glue.target_kwargs(self.base, self.ref_y, cls_y, b, self.device)
                den_cls = self.base.apply_model(x_t, sigma, c_crossattn=cls_ctx, **kw).float()
            loss = loss + self.cfg.cgdr_weight * (((denoised.float() - den_cls) ** 2) * w * (1.0 - face)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        value = loss.detach()
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(value)
            value /= self.world
        self.step += 1
        self.losses.append([self.step, float(value)])
        return float(value)

    @training_mode
    def run(self, on_step=None, should_stop=None) -> str:
        """Train to cfg.steps, saving every cfg.save_every steps and at the end. should_stop() is polled each
        step (ComfyUI's cancel); on stop the last checkpoint is kept and the exception re-raised."""
        try:
            while self.step < self.cfg.steps:
                if should_stop is not None:
                    should_stop()
                loss = self.train_step()
                if on_step is not None:
                    on_step(self.step, loss)
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save()
        except BaseException:
            log.warning("IDFusion training stopped at step %d; the last checkpoint (%s) is kept.", self.step, self.state_path)
            raise
        return self.adapter_path


def write_loss_curve(losses, path: str, size=(640, 360)):
    """A plain loss-curve PNG (PIL only), written atomically beside the checkpoint."""
    from PIL import Image, ImageDraw
    W, H = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pad = 40
    d.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    if losses:
        steps = [s for s, _ in losses]
        vals = [math.log10(max(v, 1e-12)) for _, v in losses]
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        pts = [(pad + (s - s0) / (s1 - s0) * (W - 1.5 * pad), H - pad - (v - lo) / (hi - lo) * (H - 1.5 * pad)) for s, v in zip(steps, vals)]
        if len(pts) > 1:
            d.line(pts, fill=(30, 90, 200), width=2)
        d.text((pad, H - pad + 8), f"step {s0} .. {steps[-1]}   log10(loss) {lo:.2f} .. {hi:.2f}   last {losses[-1][1]:.4g}", fill="black")
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    im.save(tmp)
    os.replace(tmp, path)
