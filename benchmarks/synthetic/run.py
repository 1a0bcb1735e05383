"""Build the pack's embedded model and prove on it that identity transfers (issue 17).

    make synthetic            # or: .hosts/0.3.75/venv/bin/python benchmarks/synthetic/run.py [--scale cpu|flux-cpu|smoke]

Stages (each cached in --work, keyed by its settings, so a re-run reuses what did not change):
1. draw faces of training identities from the continuous identity space (benchmarks/synthetic/domain.py) in random
   scenes, with captions that describe expression, pose and background but never the identity;
2. train the tiny base model on them (idfusion/synthetic.py: ComfyUI's UNetModel on 8x8 space-to-depth tokens, or
   ComfyUI's Flux class for --scale flux-cpu, and a word-level text encoder; the phases --scale lists); ship it in
   models/ (fp16);
3. train the adapter with this pack's Trainer on the training identities, the reference being another picture of
   the same identity; ship it in models/idfusion/ (fp16);
4. from the shipped fp16 files, through this pack's nodes and ComfyUI's sampler: calibrate the instrument (fitting
   the renderer, benchmarks/synthetic/fit.py) on clean, degraded and img2img pictures; sweep CFG, uncond, weight
   and end_at on validation identities; evaluate on fresh evaluation identities that no model saw, with held-out
   captions and seeds. Results, report and image grid go to --report; the figures and the chosen defaults are
   also written into the shipped files' metadata.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]

# adapter_steps 6000: chosen on VALIDATION identities (64 pictures, CFG 2, uncond "identity too"): retrieval 28, 34,
# 42, 44% after 1500, 3000, 4500, 6000 steps (each length resumes the shorter one's train state: the LR is constant
# after warm-up and every draw is seeded by step and row, so that equals a from-scratch run of that length)
SCALES = {
    "cpu": dict(base_steps=2400, base_batch=16, channels=64, pred="x0", train_ids=2000, pool=(6000, 1500),
                then=[(2000, 5e-4, "min-snr-5")],
                per_id=3, adapter_steps=6000, adapter_batch=16, samples=256, eval_steps=16),
    # the DiT family (issue 19): ComfyUI's Flux class at width 192 (2 double + 4 single blocks, 5.2 M parameters) on
    # the same pictures and captions and Flux's flow schedule, with an x0 output as the UNet's (3000 steps with Flux's
    # velocity output left every token grainy); a shorter adapter and half the evaluation pictures than the UNet
    # (CPU time: one base step 0.55 s at batch 16 against the UNet's 0.3 s)
    "flux-cpu": dict(arch="flux", hidden=192, heads=6, depth=2, depth_single=4, base_steps=3000, base_batch=16,
                     base_lr=5e-4, pred="x0", weighting="flow-min-snr-5", train_ids=2000, pool=(6000, 1500), then=[],
                     per_id=3, adapter_steps=2000, adapter_batch=16, samples=128, eval_steps=16),
    "flux-smoke": dict(arch="flux", hidden=64, heads=2, depth=1, depth_single=1, base_steps=20, base_batch=4,
                       base_lr=5e-4, pred="x0", weighting="flow-min-snr-5", train_ids=16, pool=(64, 16), then=[],
                       per_id=2, adapter_steps=4, adapter_batch=4, samples=4, eval_steps=3),
    "smoke": dict(base_steps=20, base_batch=4, channels=32, pred="x0", train_ids=16, pool=(64, 16), then=[(10, 5e-4, "min-snr-5")],
                  per_id=2, adapter_steps=4, adapter_batch=4, samples=4, eval_steps=3),   # wiring check only
}
OFFICIAL = {"cpu": "make synthetic", "flux-cpu": "make synthetic-flux"}   # scales whose files ship in models/ and docs/
CFG = 3.0
SEED = 0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_text_atomic(path: str, text: str):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---- stage 1-2: base model ---------------------------------------------------------------------
def render_pool(s, seed, features=False):
    """Training pictures for the base model: random training identities in random scenes (uint8 drawings), with
    their captions; a fifth as many pictures of two people side by side. With s["describe"] = p, that share of the
    one-person captions also names 1-3 coarse features of the face (domain.described_caption; its own seed, so the
    pictures stay the same); with s["describe_eyes"] = p, that share names the eye colour (domain.eye_words).
    features: also each picture's domain.feature_map (uint8, 255 = wholly eye or mouth),
    appended after each group's captions; the pictures and captions stay the same."""
    import domain as D
    rng = np.random.default_rng(seed)
    train = D.identities("training", s["train_ids"])
    out, drawn, maps = [], [], []
    for n, two in zip(s["pool"], (False, True)):
        pics, caps, fmaps = [], [], []
        for start in range(0, n, 256):
            m = min(256, n - start)
            scenes = [{**D.random_scene(rng), **({"pose": "facing front"} if two else {})} for _ in range(m)]
            faces = [[train[j] for j in rng.choice(len(train), 2 if two else 1, replace=False)] for _ in range(m)]
            jitter = rng.uniform(-D.JITTER, D.JITTER, (m, 2 if two else 1, 2))
            pics.append(D.to_uint8(D.render_batch(faces, scenes, jitter)[0]))
            if features:
                fmaps.append((D.feature_map(faces, scenes, jitter) * 255).round().to(torch.uint8).numpy())
            caps += [D.caption(sc, two=two) for sc in scenes]
            drawn += [f[0] for f in faces]
        out += [np.concatenate(pics), caps]
        maps.append(np.concatenate(fmaps) if features else None)
    if s.get("describe"):
        words = np.random.default_rng(seed + 100)
        out[1] = [D.described_caption(c, ident, words) if words.random() < s["describe"] else c
                  for c, ident in zip(out[1], drawn[:len(out[1])])]
    if s.get("describe_eyes"):
        words = np.random.default_rng(seed + 200)
        out[1] = [", ".join([c, *D.eye_words(ident)]) if words.random() < s["describe_eyes"] else c
                  for c, ident in zip(out[1], drawn[:len(out[1])])]
    return out + maps if features else out


def base_settings(s):
    import domain as D
    from idfusion_pack.idfusion import synthetic
    flux = s.get("arch") == "flux"
    factor = s.get("factor", D.FACTOR)   # the token: factor x factor pixels of the model's resolution
    if flux:
        unet = synthetic.flux_config(3 * factor ** 2, s["hidden"], s["heads"], s["depth"], s["depth_single"])
    else:
        unet = synthetic.unet_config(3 * factor ** 2, D.SIZE // factor, s["channels"], s.get("mult", (1, 2)))
    out = {"base_steps": s["base_steps"], "base_batch": s["base_batch"], "prediction": s["pred"], "unet": unet,
           "codec": {"pool": 8 // factor, "factor": factor}, "text": {"dim": unet.get("context_dim", unet.get("context_in_dim")), "length": 16},
           "vocabulary": D.vocabulary(described=bool(s.get("describe")), eyes=bool(s.get("describe_eyes"))), "lr": s.get("base_lr", 1e-3), "ema": 0.999, "seed": SEED,
           "train_ids": s["train_ids"], "pool": s["pool"], "domain": "continuous-v1"}
    if flux:   # only then: the UNet's settings (and so its cache key) stay what they were
        out.update(architecture="flux", weighting=s["weighting"])
    if s.get("describe"):   # likewise
        out["describe"] = s["describe"]
    if s.get("describe_eyes"):   # likewise
        out["describe_eyes"] = s["describe_eyes"]
    if s.get("base_weighting"):   # likewise: the first phase's weighting when it is not "v" (base_study.py)
        out["weighting"] = s["base_weighting"]
    return out


def architecture(settings) -> str:
    return settings.get("architecture", "unet")


def feature_weight(weighting: str) -> tuple[str, float]:
    """"<weighting>+features-<k>" -> (weighting, k): the pixels of the eyes and mouth (domain.feature_map) weigh 1 + k
    in the loss instead of 1. They are about 3% of a picture and hold 5 of the 16 identity dims; an MSE that weighs
    every pixel alike lets the base draw them from its prior (base_study.py --arm features)."""
    name, _, k = weighting.partition("+features-")
    return name, float(k) if k else 0.0


def loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """x0-space loss weights. "v": v-prediction's MSE, (sigma^2 + 1) / sigma^2, which puts almost all the gradient on
    nearly clean pictures (weight 1100 at sigma 0.03, 1 at sigma 14). "min-snr-5": the same, capped at 5 (Min-SNR
    weighting, Hang et al. 2023), so the noisy steps that decide where the eyes and mouth go get their share.
    A "+features-k" suffix (feature_weight) weighs pixels, not noise levels: it is ignored here."""
    weighting = feature_weight(weighting)[0]
    w = (sigma ** 2 + 1) / sigma ** 2
    if weighting == "v":
        return w
    if weighting == "min-snr-5":
        return w.clamp(max=5.0)
    if weighting == "flow":   # Flux's flow schedule: x0 error / sigma^2 is the velocity (flow-matching) loss
        return 1.0 / sigma ** 2
    if weighting == "flow-min-snr-5":   # the same idea as min-snr-5 on the flow schedule: 1 + SNR, capped at 5
        return (1.0 + ((1.0 - sigma) / sigma) ** 2).clamp(max=5.0)
    raise ValueError(f"unknown loss weighting {weighting!r}")


def base_phases(s) -> list[dict]:
    """The base model's training: settings of each phase, each phase's cache key covering every phase before it."""
    common = base_settings(s)
    phases = [common]
    for steps, lr, weighting in s["then"]:
        phases.append({**phases[-1], "then": [*phases[-1].get("then", []), {"steps": steps, "lr": lr, "weighting": weighting}]})
    return phases


def train_base(s, work, device):
    """-> (unet_state, text_state, settings): trained weights (fp32) after every phase, each phase cached in work:
    phase 1 from random weights with the v weighting, then each fine-tuning phase of s["then"]."""
    import domain as D
    from idfusion_pack.idfusion import synthetic
    from idfusion_pack.idfusion.adapter import read_safetensors, save_safetensors_atomic
    phases = base_phases(s)
    settings = phases[-1]
    paths = [os.path.join(work, f"base-{key(ph)}.safetensors") for ph in phases]
    done = max([i for i, p in enumerate(paths) if os.path.isfile(p)], default=-1)
    state = None
    if done >= 0:
        tensors, _ = read_safetensors(paths[done], "idfusion.synthetic_base", "synthetic base model")
        log(f"base model: reused {paths[done]}")
        state = tensors
        if done == len(phases) - 1:
            return ({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")},
                    {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}, settings)
    torch.manual_seed(SEED)
    unet = settings["unet"]
    flux = architecture(settings) == "flux"
    patcher = synthetic.build_patcher(unet, prediction=s["pred"], architecture=architecture(settings))
    vocab = settings["vocabulary"]
    text = synthetic.WordEncoder(len(vocab), settings["text"]["dim"], settings["text"]["length"]).to(device)
    if state is None:
        from random_models import randomize_
        randomize_(patcher.model.diffusion_model, SEED)
        dm = patcher.model.diffusion_model
        with torch.no_grad():   # a zero output layer: the untrained model predicts the mean, a stable start
            if flux:   # DiT's adaLN-zero start too: zero modulation, every block starts as the identity
                zero = [m for n, m in dm.named_modules() if n.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1"))]
                zero.append(dm.final_layer.linear)
            else:
                zero = [dm.out[-1]]
            for m in zero:
                for p in m.parameters():
                    p.zero_()
    else:
        patcher.model.diffusion_model.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
    if flux:   # Flux's blocks add into their input in place: the pack's wrapper keeps what backward needs
        import comfy.model_management as mm
        from idfusion_pack.idfusion import patch_flux
        patcher = patch_flux.trainable(patcher)
        mm.load_models_gpu([patcher])
    model = patcher.model.to(device)
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": vocab, "length": settings["text"]["length"]})
    tokens = lambda texts: torch.tensor([[p[0] for p in tok.tokenize_with_weights(t)["words"][0]] for t in texts])
    t0 = time.time()
    weightings = [settings.get("weighting", "v"), *(th["weighting"] for th in settings.get("then", []))]   # by phase
    features = any(feature_weight(w)[1] for w in weightings[done + 1:])
    singles, s_caps, doubles, d_caps, *maps = render_pool(s, seed=1, features=features)
    log(f"base model: drew {len(singles)} + {len(doubles)} training pictures in {time.time() - t0:.0f}s")
    as_latent = lambda pics: D.to_latent(D.to_tensor(list(pics)), settings["codec"]["factor"])   # noqa: E731
    ms = model.model_sampling
    params = list(model.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    B = s["base_batch"]
    for phase in range(done + 1, len(phases)):
        ph = phases[phase]
        steps, lr, weighting = ((ph["base_steps"], ph["lr"], ph.get("weighting", "v")) if phase == 0 else
                                (ph["then"][-1]["steps"], ph["then"][-1]["lr"], ph["then"][-1]["weighting"]))
        k = feature_weight(weighting)[1]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        ema = [p.detach().clone() for p in params]
        g = torch.Generator().manual_seed(SEED + phase)
        t0 = time.time()
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * D.cosine_lr(step, steps, 100 if phase == 0 else 50)
            two = step % 5 == 4                       # one batch in five: two people side by side
            pool, caps = (doubles, d_caps) if two else (singles, s_caps)
            idx = torch.randint(len(pool), (B // 2 if two else B,), generator=g)
            x0 = as_latent(pool[idx.numpy()]).to(device)
            pixel_w = 1.0
            if k:   # the eyes' and mouth's pixels weigh 1 + k, laid out like the latent (every channel of a pixel)
                fmap = torch.from_numpy(maps[1 if two else 0][idx.numpy()]).float().div(255)[:, None].expand(-1, 3, -1, -1)
                pixel_w = (1 + k * D.to_latent(fmap, settings["codec"]["factor"])).to(device)
            texts = [caps[i] if torch.rand(1, generator=g) > 0.1 else "" for i in idx.tolist()]   # 10% unconditional
            ctx = text(tokens(texts).to(device))
            t = torch.randint(0, 1000, (x0.shape[0],), generator=g).float()
            sigma = (patch_flux.train_sigma(ms, t) if flux else ms.sigma(t)).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            denoised = model.apply_model(ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0), sigma, c_crossattn=ctx)
            loss = (((denoised - x0) ** 2) * pixel_w * loss_weight(sigma, weighting).view(-1, 1, 1, 1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                d = min(settings["ema"], (1 + step) / (10 + step))
                for e, p in zip(ema, params):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
            if step % 100 == 0 or step == steps - 1:
                log(f"base phase {phase + 1} ({weighting}) step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)
        unet_state = {k: v.detach().cpu().contiguous() for k, v in model.diffusion_model.state_dict().items()}
        text_state = {k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()}
        tensors = {**{f"unet.{k}": v for k, v in unet_state.items()}, **{f"text.{k}": v for k, v in text_state.items()}}
        save_safetensors_atomic(tensors, paths[phase], {"format": "idfusion.synthetic_base", "format_version": "1",
                                                        "settings": json.dumps(ph), "seconds": f"{time.time() - t0:.0f}"})
        log(f"base model: phase {phase + 1} trained in {time.time() - t0:.0f}s -> {paths[phase]}")
    return unet_state, text_state, settings


def ship_base(path, unet_state, text_state, settings, figures=None):
    from idfusion_pack.idfusion import synthetic
    info = {"prediction": settings["prediction"],
            "training": {k: settings[k] for k in ("base_steps", "base_batch", "lr", "ema", "weighting", "then") if k in settings},
            "seed": str(SEED), "rebuild": "make synthetic"}
    if figures:
        info["figures"] = figures
    synthetic.save(path, settings["unet"], unet_state, text_state, settings["vocabulary"], settings["text"]["length"],
                   synthetic.PixelCodec(**settings["codec"]), info, architecture=architecture(settings))


# ---- stage 3: adapter --------------------------------------------------------------------------
def adapter_data(work, ids, per_id, codec, features=0.0):
    """The adapter's drawn dataset folder: one per identity count, pictures per identity, codec pool and features
    weight (pool and features enter the key only when not 1 / 0, so the shipped base's folder keeps its name)."""
    drawn = {"ids": ids, "per_id": per_id, "v": 3, **({"pool": codec.pool} if codec.pool > 1 else {}),
             **({"features": features} if features else {})}
    return os.path.join(work, f"adapter-data-{key(drawn)}")


def write_dataset(folder, idents, per_id, seed, pool=1, features=0.0):
    """One folder per training identity: pictures at the size a user of the codec sees (each pixel pool x pool) with
    face masks, captions from the 36 training scenes only (the reference of a sample is another picture of its
    identity, in another scene). features k > 0: the masks are (face + k * eyes and mouth) / (1 + k), so a
    face_loss_weight of (1 + k) w weighs the face w and the eyes and mouth (domain.feature_map) k w more."""
    import domain as D
    from PIL import Image
    rng = np.random.default_rng(seed)
    for start in range(0, len(idents), 64):
        chunk = idents[start:start + 64]
        faces = [[ident] for ident in chunk for _ in range(per_id)]
        scenes = [D.random_scene_from(rng, held_out=False) for _ in faces]
        jitter = rng.uniform(-D.JITTER, D.JITTER, (len(faces), 1, 2))
        pics, masks = D.render_batch(faces, scenes, jitter)
        if features:
            masks = (masks + features * D.feature_map(faces, scenes, jitter)) / (1 + features)
        pics = D.upscale(D.to_uint8(pics), pool)
        masks = D.upscale((masks.numpy() * 255).round().astype(np.uint8)[..., None], pool)[..., 0]
        for n, (pic, mask, scene) in enumerate(zip(pics, masks, scenes)):
            d = os.path.join(folder, f"id{start + n // per_id:04d}")
            os.makedirs(d, exist_ok=True)
            stem = os.path.join(d, f"{n % per_id:03d}")
            Image.fromarray(pic).save(stem + ".png")
            Image.fromarray(mask).save(stem + "_mask.png")
            with open(stem + ".txt", "w") as f:
                f.write(D.caption(scene))


def adapter_recipe(s) -> dict:
    """The shipped adapter's TrainConfig fields at scale `s` (studies continue it with overrides)."""
    return dict(steps=s["adapter_steps"], batch_size=s["adapter_batch"], lr=1e-3, warmup_steps=20,
                save_every=max(50, s["adapter_steps"] // 4), seed=SEED, init="attn1", reference="other image",
                reference_dropout=0.1, face_loss_weight=1.0, encoding="cached", timestep=0,
                gradient_checkpointing=False)   # 96 px: memory is no concern, recompute would cost time


def train_adapter(s, work, patcher, clip, codec, train_idents, base_key, reference_tokens="all", features=0.0):
    """The adapter of recipe `s` on a base (cached by its settings). features k > 0: the eyes and mouth weigh k times
    the face's loss weight more (write_dataset's masks; the face's weight itself unchanged)."""
    import domain as D
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    recipe = adapter_recipe(s)
    if features:
        recipe["face_loss_weight"] *= 1 + features
    cfg = TrainConfig(**recipe, **({"reference_tokens": reference_tokens} if reference_tokens != "all" else {}))
    # options added after the shipped run enter the key only when set, so its key (and cache) stays what it was
    later = {"reference_tokens": "all", "reference_shift": 0.0, "reference_noise": 0.0, "reference_background": 0.0,
             "lr_decay_steps": 0}
    settings = {"cfg": {k: v for k, v in cfg.__dict__.items() if k not in later or v != later[k]},
                "ids": len(train_idents), "per_id": s["per_id"], "base": base_key, "v": 3,
                **({"features": features} if features else {})}
    out = os.path.join(work, f"adapter-{key(settings)}")
    data = adapter_data(work, len(train_idents), s["per_id"], codec, features)
    if not os.path.isdir(data):
        t0 = time.time()
        write_dataset(data + ".tmp", train_idents, s["per_id"], seed=5, pool=codec.pool, features=features)
        os.replace(data + ".tmp", data)
        log(f"adapter: drew its dataset in {time.time() - t0:.0f}s")
    ds = FaceDataset(data, D.SIZE * codec.pool)   # the pictures a user of this codec sees
    trainer = Trainer(patcher, clip, codec, ds, out, "synthetic", cfg)
    trainer.resume()
    t0 = time.time()
    if trainer.step < cfg.steps:
        log(f"adapter: {len(ds)} pictures of {len(train_idents)} identities, steps {trainer.step}..{cfg.steps}")
        trainer.run(on_step=lambda step, loss: step % 100 == 0 and log(f"adapter step {step} loss {loss:.4f} ({time.time() - t0:.0f}s)"))
    log(f"adapter: trained in {time.time() - t0:.0f}s ({trainer.adapter_path})")
    first = float(np.mean([l for _, l in trainer.losses[:20]]))
    last = float(np.mean([l for _, l in trainer.losses[-20:]]))
    return trainer.adapter_path, {"loss_first20": first, "loss_last20": last, "steps": cfg.steps, "batch": cfg.batch_size,
                                  "pictures": len(ds), "identities": len(train_idents), "lr": cfg.lr,
                                  "lr_decay_steps": cfg.lr_decay_steps,
                                  "reference_dropout": cfg.reference_dropout, "face_loss_weight": cfg.face_loss_weight,
                                  "init": cfg.init, "encoding": cfg.encoding, "seed": cfg.seed}


def open_study(doc: str, out_name: str, argv=None, ids: int = 96, steps: int | None = None, scale: str = "cpu",
               extra: dict | None = None):
    """The common start of the validation studies: their flags (--ids, --out, --work, --comfyui, --threads, --steps
    when the study trains, and `extra`: flag -> add_argument keywords), ComfyUI and the pack loaded, the shipped base
    and adapter of `scale`'s family.
    -> (args, scale settings, patcher, clip, codec, shipped adapter, its recommended Generator settings)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=ids, help="validation identities (2 captions each)")
    if steps is not None:
        ap.add_argument("--steps", type=int, default=steps, help="adapter training steps (see the description above)")
    for flag, kw in (extra or {}).items():
        ap.add_argument(flag, **kw)
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic"))
    ap.add_argument("--out", default=os.path.join(ROOT, ".synthetic", out_name))
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from train import load_pack
    load_pack(args.comfyui, cpu=True)
    from idfusion_pack.idfusion import synthetic
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    stem = "synthetic_faces_flux" if SCALES[scale].get("arch") == "flux" else "synthetic_faces"
    patcher, clip, codec, _ = synthetic.load(os.path.join(ROOT, "models", f"{stem}.safetensors"))
    adapter_path = os.path.join(ROOT, "models", "idfusion", f"{stem}_adapter.safetensors")
    adapter = IDFusionAdapter.load(adapter_path)
    from idfusion_pack.idfusion.adapter import recommended_settings
    return args, SCALES[scale], patcher, clip, codec, adapter, recommended_settings(adapter_path)


def continue_adapter(s, work, patcher, clip, codec, base_key, steps, overrides, tag=""):
    """The shipped adapter's train state continued `steps` more steps with TrainConfig `overrides` (resume: same
    data order and seeds; with no overrides this equals a from-scratch run of the longer length). Cached in `work`."""
    import shutil
    import domain as D
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    train_ids = D.identities("training", s["train_ids"])
    src, _ = train_adapter(s, work, patcher, clip, codec, train_ids, base_key)   # cached: the shipped run
    total = s["adapter_steps"] + steps
    # the key's "augment" field holds any overrides: named so for the first study's cache (augment_study.py)
    out = os.path.join(work, f"augment-study-{key({'src': src, 'steps': total, 'augment': overrides})}")
    os.makedirs(out, exist_ok=True)
    state = os.path.join(out, "synthetic.train-state.safetensors")
    if not os.path.isfile(state):
        shutil.copyfile(src.replace(".safetensors", ".train-state.safetensors"), state)
    cfg = TrainConfig(**{**adapter_recipe(s), "steps": total, "save_every": 500, **overrides})
    data = adapter_data(work, len(train_ids), s["per_id"], codec)
    trainer = Trainer(patcher, clip, codec, FaceDataset(data, D.SIZE * codec.pool), out, "synthetic", cfg)
    trainer.resume()
    t0 = time.time()
    if trainer.step < total:
        trainer.run(on_step=lambda step, loss: step % 250 == 0 and log(f"{tag or overrides or 'no overrides'} step "
                                                                        f"{step} loss {loss:.4f} ({time.time() - t0:.0f}s)"))
    return trainer.adapter_path


def ship_adapter(src, dst, info, figures=None, defaults=None):
    from idfusion_pack.idfusion.adapter import IDFusionAdapter, save_safetensors_atomic
    adapter = IDFusionAdapter.load(src)
    meta = {**adapter.metadata(), "family": "synthetic_faces", "training": json.dumps(info), "seed": str(SEED),
            "training_steps": str(info["steps"]), "rebuild": "make synthetic"}
    if figures:
        meta["figures"] = json.dumps(figures)
    if defaults:
        meta["recommended"] = json.dumps(defaults)
    save_safetensors_atomic({k: v.half() for k, v in adapter.state_tensors().items()}, dst, meta)
    return IDFusionAdapter.load(dst)


# ---- stage 4: generation through the nodes ------------------------------------------------------
def node_call(node, fn, *args, **kwargs):
    """Call a node as ComfyUI does (under inference mode); return its outputs tuple."""
    with torch.inference_mode():
        r = getattr(node, fn)(*args, **kwargs)
    return r["result"] if isinstance(r, dict) else r


class Generator:
    """Generation through this pack's nodes (Encode Reference, Apply, Apply Multi-Identity) and ComfyUI's sampler,
    with the settings chosen on the validation identities (cfg, uncond, weight)."""

    def __init__(self, patcher, clip, codec, adapter, steps, cfg=CFG, uncond="text only", weight=1.0, end_at=1.0):
        import domain as D
        import idfusion_pack
        self.D, self.patcher, self.clip, self.codec, self.adapter, self.steps = D, patcher, clip, codec, adapter, steps
        self.cfg, self.uncond, self.weight, self.end_at = cfg, uncond, weight, end_at
        self.reference_tokens = "all"
        self.block_weights = ""     # Apply's per-block weights (empty: 1 everywhere)
        from idfusion_pack.idfusion import patch_flux
        self.flux = patch_flux.is_flux(patcher)
        self.nodes = {k: v() for k, v in idfusion_pack.NODE_CLASS_MAPPINGS.items()}

    def identity(self, drawings: list[np.ndarray], name="ref"):
        images = torch.from_numpy(self.D.upscale(np.stack(drawings), self.codec.pool)).float() / 255.0
        return node_call(self.nodes["IDFusionEncodeReference"], "encode", self.patcher, self.codec, images, 0, name)[0]

    def apply(self, identity):
        return node_call(self.nodes["IDFusionApply"], "apply", self.patcher, self.adapter, identity, self.weight, 0.0,
                         self.end_at, self.uncond, "adapter default", reference_tokens=self.reference_tokens,
                         block_weights=self.block_weights)[0]

    def apply_regions(self, idents, masks):
        kw = {f"identity_{i + 1}": x for i, x in enumerate(idents)}
        return node_call(self.nodes["IDFusionApplyMultiIdentity"], "apply", self.patcher, self.adapter, masks,
                         self.weight, 0.0, self.end_at, self.uncond, "adapter default", **kw)[0]

    def encode_text(self, captions):
        with torch.inference_mode():
            return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(c)) for c in captions])

    def sample(self, model, captions, seed, width=None, init=None, denoise=1.0):
        """-> pictures (B, 3, SIZE, width) in [-1, 1] at the model's resolution. init: drawings (B, 3, H, W) in [-1, 1]
        to start from (img2img with `denoise`)."""
        import comfy.sample
        D = self.D
        width = width or D.SIZE
        f = self.codec.factor
        if init is not None:
            latent = D.to_latent(init.float(), f)
        else:
            latent = torch.zeros(len(captions), self.codec.latent_channels, D.SIZE // f, width // f)
        extra = {"pooled_output": None} if self.flux else {}   # model_base.Flux reads it (None: the word encoder has none)
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent, seed)
            pos = [[self.encode_text(captions), dict(extra)]]
            neg = [[self.encode_text([""]), dict(extra)]]
            x = comfy.sample.sample(model, noise, self.steps, self.cfg, "euler", "normal", pos, neg, latent,
                                    denoise=denoise, seed=seed, disable_pbar=True)
            pictures = self.codec.decode(x).movedim(-1, 1)
            if self.codec.pool > 1:
                pictures = torch.nn.functional.avg_pool2d(pictures, self.codec.pool)
            return (pictures * 255).round() / 127.5 - 1     # 8-bit, as SaveImage would write it


# ---- measuring ---------------------------------------------------------------------------------------------------
def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def rate(hits) -> dict:
    hits = np.asarray(hits, dtype=float)
    p = float(hits.mean())
    return {"p": p, "se": se(p, len(hits)), "n": len(hits)}


def mean_se(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "se": float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0, "n": len(a)}


def paired(a, b) -> dict:
    """Difference of two paired hit lists, with its standard error and the difference in standard errors."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    s = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"diff": float(d.mean()), "se": s, "in_se": float(d.mean() / s) if s > 0 else 0.0, "n": len(d)}


def flat_hf(pictures: torch.Tensor, reads: list[dict]) -> list[float]:
    """High-frequency energy in flat regions, per picture: the mean squared 3x3 Laplacian of the picture (0-255 units)
    over pixels whose 5x5 neighbourhood is uniform in the renderer's fit of that picture (no edge of the drawing
    nearby), so only noise the drawing does not explain is counted."""
    import fit as F
    drawn = F.redraw(reads)                                              # (B, 3, H, W) in [0, 1]
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    lap = torch.nn.functional.conv2d((pictures.float() + 1) * 127.5, k, groups=3, padding=1).pow(2).mean(1)
    spread = (torch.nn.functional.max_pool2d(drawn, 5, 1, 2) + torch.nn.functional.max_pool2d(-drawn, 5, 1, 2)).amax(1)
    flat = spread < 2 / 255
    flat[:, :2], flat[:, -2:], flat[:, :, :2], flat[:, :, -2:] = False, False, False, False
    return [float(lap[i][flat[i]].mean()) if flat[i].any() else float("nan") for i in range(len(reads))]


def embedding(identity: dict, expression: str, turn: float) -> np.ndarray:
    """A face as one vector, for the literature's similarity-based metrics (issue 20: MultiID-Bench's copy-paste
    and leakage, UMO's ID-Conf) in place of an ArcFace embedding: the identity in units of the prior's spread,
    centred on the prior's mean, followed by the scene a face shows (expression one-hot, head turn in units of a
    pose step). Two pictures of one identity in different scenes are then close but not equal, as two photos of one
    person are; the metrics are defined on such vectors exactly as on ArcFace ones."""
    import domain as D
    import fit as F
    v = (D.identity_vector(identity) - F.MEAN) / F.SCALE
    onehot = np.eye(len(D.EXPRESSIONS))[D.EXPRESSIONS.index(expression)]
    return np.concatenate([v, onehot, [turn / max(D.POSES.values())]])


def retrieval_hits(reads, truths, candidates) -> list[bool]:
    import fit as F
    return [F.retrieval_rank(r["identity"], 0, [t] + candidates) == 0 for r, t in zip(reads, truths)]


def errors(reads, truths) -> dict:
    import fit as F
    errs = [F.identity_errors(r["identity"], t) for r, t in zip(reads, truths)]
    return {k: [e[k] for e in errs] for k in errs[0]}


def reference_drawings(idents, rng, scenes=None, jitter=None, backgrounds=None, noise_sd=0.0):
    """Reference pictures (N, SIZE, SIZE, 3) uint8 of one face each: random scenes unless given, position jitter in
    the training range unless given; optional pixel noise (sd in 0-255 units) and off-set background colours."""
    import domain as D
    scenes = scenes or [D.random_scene(rng) for _ in idents]
    if jitter is None:
        jitter = rng.uniform(-D.JITTER, D.JITTER, (len(idents), 1, 2))
    pics = D.to_uint8(D.render_batch([[i] for i in idents], scenes, jitter, backgrounds)[0])
    if noise_sd:
        pics = np.clip(pics + rng.normal(0, noise_sd, pics.shape), 0, 255).round().astype(np.uint8)
    return pics, scenes


def transfer_inputs(ids, per, seed):
    """The transfer cell's draws: one reference per identity in a random scene, and `per` captions per identity from
    held-out scenes that differ from the reference's in expression, pose and background.
    -> (references, reference scenes, captions per identity, caption scenes flattened)."""
    import domain as D
    rng = np.random.default_rng(seed)
    refs, ref_scenes = reference_drawings(ids, rng)
    caps_scenes = [[D.random_scene_from(rng, held_out=True, **{k: ("not", rs[k]) for k in D.SCENE_ATTRS})
                    for _ in range(per)] for rs in ref_scenes]
    return refs, ref_scenes, [[D.caption(sc) for sc in c] for c in caps_scenes], [sc for c in caps_scenes for sc in c]


def validation_cell(n_ids, per, seed):
    """For studies that choose something: VALIDATION identities (never the evaluation ones), the 99 fresh candidates,
    each picture's true identity, and the transfer cell's draws (transfer_inputs) for them."""
    import domain as D
    ids = D.identities("validation", n_ids)
    return ids, D.identities("candidates", 99), [i for i in ids for _ in range(per)], transfer_inputs(ids, per, seed)


def generate(gen, refs, captions, seed0, with_identity=True):
    """refs: per identity a list of reference drawings; captions: per identity its captions (one picture each)."""
    out = []
    for i, (r, caps) in enumerate(zip(refs, captions)):
        model = gen.apply(gen.identity(list(r))) if with_identity else gen.patcher
        out.append(gen.sample(model, caps, seed=seed0 + i))
    return torch.cat(out)


def compare_bases(args, s, rec, bases: dict) -> tuple[dict, dict]:
    """For the studies that change the base model: an adapter of `args.steps` steps (the shipped recipe otherwise)
    trained from scratch on each base, and the same transfer cell (`args.ids` validation identities, one clean
    reference each, two held-out captions, the same seeds) at the shipped defaults `rec` and at CFG 3 "text only",
    with and without each adapter. bases: name -> (scale settings, (patcher, clip, codec)); the first is the control,
    the others are each compared with it, paired on the same pictures.
    -> (the figures, name -> adapter)."""
    import domain as D
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    train_ids = D.identities("training", s["train_ids"])
    adapters = {}
    for name, (scale, (p, c, k)) in bases.items():
        path, _ = train_adapter({**scale, "adapter_steps": args.steps}, args.work, p, c, k, train_ids,
                                key(base_phases(scale)[-1]))
        adapters[name] = IDFusionAdapter.load(path)
    ids, candidates, truths, (refs, _, captions, _) = validation_cell(args.ids, 2, 8_100)
    settings = {"shipped defaults": rec, "CFG 3 text only": {"cfg": 3.0, "uncond": "text only", "weight": 1.0}}
    control, *tested = bases
    out = {"identities": args.ids, "pictures per cell": len(truths), "adapter steps": args.steps, "settings": settings}
    for label, setting in settings.items():
        hits, errs, hf = {}, {}, {}
        for name, (_, (p, c, k)) in bases.items():
            for with_identity in (True, False):
                cell = name if with_identity else f"{name}, without adapter"
                gen = Generator(p, c, k, adapters[name], s["eval_steps"], **setting)
                hits[cell], errs[cell], hf[cell] = read_cell(gen, [[r] for r in refs], captions, 8_200, truths,
                                                             candidates, with_identity)
                log(f"{label}, {cell}: retrieval {np.mean(hits[cell]):.3f}, flat-region energy {hf[cell]:.2f}")
        attrs = list(errs[control])
        out[label] = {
            "retrieval": {a: rate(h) for a, h in hits.items()},
            **{f"{name} minus {control}": paired(hits[name], hits[control]) for name in tested},
            "noise ratio": {a: hf[a] / hf[f"{a}, without adapter"] for a in bases},
            "error": {a: {k: mean_se(e[k]) for k in attrs} for a, e in errs.items()},
            "error ratio to without": {a: {k: float(np.mean(errs[a][k]) / np.mean(errs[f"{a}, without adapter"][k]))
                                           for k in attrs} for a in bases}}
    return out, adapters


def cell_figures(hits: dict, errs: dict, hf: dict, arms) -> dict:
    """One setting's cells as the adapter studies publish them: retrieval per cell, and per adapter arm its flat-region
    noise ratio, per-attribute errors and error ratios against the "without adapter" cell (same seeds)."""
    attrs = list(errs[next(iter(arms))])
    without = errs["without adapter"]
    return {"retrieval": {a: rate(h) for a, h in hits.items()},
            "noise ratio": {a: hf[a] / hf["without adapter"] for a in arms},
            "error": {a: {k: mean_se(e[k]) for k in attrs} for a, e in errs.items()},
            "error ratio to without": {a: {k: float(np.mean(e[k]) / np.mean(without[k])) for k in attrs}
                                       for a, e in errs.items() if a != "without adapter"}}


def read_cell(gen, refs, captions, seed0, truths, candidates, with_identity=True):
    """generate, then the instrument's reading: -> (retrieval hits, per-attribute errors, mean flat-region energy)."""
    import fit as F
    pics = generate(gen, refs, captions, seed0, with_identity)
    reads = F.fit(pics)
    return retrieval_hits(reads, truths, candidates), errors(reads, truths), float(np.nanmean(flat_hf(pics, reads)))


def off_set_background(rng) -> tuple:
    """An RGB background at least 80 away from every named background: a colour no caption can ask for."""
    import domain as D
    named = np.array(list(D.BACKGROUNDS.values()), dtype=float)
    while True:
        c = rng.integers(0, 256, 3)
        if np.linalg.norm(named - c, axis=1).min() >= 80:
            return tuple(int(v) for v in c)


def scene_rates(reads, scenes, ref_scenes=None) -> dict:
    """How often the read scene matches the caption's, and (with ref_scenes) how often it copies the reference's
    expression or pose although the caption asks for another."""
    import domain as D
    out = {f"{k} follows caption": rate([r[k] == s[k] for r, s in zip(reads, scenes)]) for k in D.SCENE_ATTRS}
    if ref_scenes is not None:
        for k in ("expression", "pose"):
            out[f"{k} copied from reference"] = rate([r[k] == rs[k] for r, rs in zip(reads, ref_scenes)])
    return out


def degrade(pics: torch.Tensor, seed: int) -> torch.Tensor:
    """3x3 box blur plus Gaussian pixel noise of sd 12 (0-255 units), quantised: the instrument's degraded inputs."""
    k = torch.ones(3, 1, 3, 3) / 9
    x = torch.nn.functional.conv2d(torch.nn.functional.pad((pics + 1) * 127.5, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 12
    return x.clamp(0, 255).round() / 127.5 - 1


def calibrate(gen, n_ids, per, candidates, split="evaluation", denoise=(0.5,)):
    """The instrument on pictures whose truth is known, published with every result: clean drawings, degraded
    drawings, and the base model's own img2img (one row per strength in `denoise`; 0.5 as published) of drawings,
    all of evaluation identities (studies that compare base models: `split` validation) in held-out scenes;
    retrieval is among the true identity and 99 other fresh candidates, as in the evaluation."""
    import domain as D
    import fit as F
    rng = np.random.default_rng(5_000)
    ids = D.identities(split, n_ids)
    truths = [i for i in ids for _ in range(per)]
    scenes = [D.random_scene_from(rng, held_out=True) for _ in truths]
    jitter = rng.uniform(-D.JITTER, D.JITTER, (len(truths), 1, 2))
    clean = D.render_batch([[t] for t in truths], scenes, jitter)[0]
    # a check on the fit with no fitting: the mean colour of the pixels that are (nearly) wholly iris in the truth
    iris = (D.feature_map([[t] for t in truths], scenes, jitter, keys=("eyes",)) > 0.9).float()
    drawn_eyes = D.srgb_to_lab(D.colours_of(truths, [sc["background"] for sc in scenes])["eyes"].numpy())

    def iris_pixels(pics):
        rgb = ((pics.float() + 1) / 2).clamp(0, 1)
        mean = (rgb * iris[:, None]).sum((2, 3)) / iris.sum((1, 2))[:, None].clamp(min=1)
        return mean_se(D.delta_e(D.srgb_to_lab(mean.numpy()), drawn_eyes))
    img2img = {f"base model img2img, denoise {d}": torch.cat([
        gen.sample(gen.patcher, [D.caption(sc) for sc in scenes[i:i + 32]], seed=5_000 + i, init=clean[i:i + 32],
                   denoise=d) for i in range(0, len(truths), 32)]) for d in denoise}
    out, pictures = {}, {}
    for name, pics in (("clean drawings", clean), ("blur 3x3 + noise sd 12", degrade(clean, 5_001)), *img2img.items()):
        reads = F.fit(pics)
        out[name] = {**{k: mean_se(v) for k, v in errors(reads, truths).items()}, **scene_rates(reads, scenes),
                     "retrieval": rate(retrieval_hits(reads, truths, candidates)), "eyes, iris pixels": iris_pixels(pics)}
        pictures[name] = pics[:6]
        log(f"calibration, {name}: retrieval {out[name]['retrieval']['p']:.3f}, " +
            ", ".join(f"{k} {out[name][k]['mean']:.2f}" for k in ("skin", "hair", "eyes", "face_w", "eye_spacing")))
    return out, pictures


def sweep(gen, n_ids, per, candidates):
    """The shipped defaults, chosen on VALIDATION identities (never the evaluation ones): every setting samples the
    same captions and seeds. Rule, fixed before the sweep ran: among settings whose flat-region noise ratio is at most
    1.1 and whose expression and pose following are within 5 points of the base model's at that CFG, the highest
    retrieval; failing that, the highest retrieval with noise ratio at most 1.1; failing that, the highest retrieval.
    The `end_at` rows (the identity acts over the first part of sampling only) were added to the grid after
    guidance_study.py, on other validation pictures, found that they keep most of "text only"'s retrieval at about
    the flat-region noise of "identity too"; the rule itself is unchanged."""
    import domain as D
    import fit as F
    ids = D.identities("validation", n_ids)
    refs, ref_scenes, captions, scenes = transfer_inputs(ids, per, 7_000)
    truths = [i for i in ids for _ in range(per)]
    settings = [(3.0, "text only", 1.0, 1.0), (2.0, "text only", 1.0, 1.0), (4.0, "text only", 1.0, 1.0),
                (3.0, "identity too", 1.0, 1.0), (2.0, "identity too", 1.0, 1.0), (2.0, "identity too", 1.5, 1.0),
                (2.0, "identity too", 2.0, 1.0), (3.0, "text only", 1.0, 0.8), (2.0, "text only", 1.0, 0.8),
                (3.0, "text only", 1.0, 0.6), (2.0, "text only", 1.0, 0.6)]
    base = {}
    results = []
    for cfg, uncond, weight, end_at in settings:
        gen.cfg, gen.uncond, gen.weight, gen.end_at = cfg, uncond, weight, end_at
        if cfg not in base:
            plain = generate(gen, [[r] for r in refs], captions, 7_100, with_identity=False)
            reads0 = F.fit(plain)
            base[cfg] = {"hf": float(np.nanmean(flat_hf(plain, reads0))), **scene_rates(reads0, scenes)}
        pics = generate(gen, [[r] for r in refs], captions, 7_100)
        reads = F.fit(pics)
        r = {"cfg": cfg, "uncond": uncond, "weight": weight, "end_at": end_at,
             "retrieval": rate(retrieval_hits(reads, truths, candidates)), **scene_rates(reads, scenes),
             "noise_ratio": float(np.nanmean(flat_hf(pics, reads))) / base[cfg]["hf"]}
        r["scene_ok"] = all(r[f"{k} follows caption"]["p"] >= base[cfg][f"{k} follows caption"]["p"] - 0.05
                            for k in ("expression", "pose"))
        results.append(r)
        log(f"sweep cfg {cfg} uncond {uncond} weight {weight} end_at {end_at}: retrieval {r['retrieval']['p']:.3f}, noise ratio "
            f"{r['noise_ratio']:.2f}, expression {r['expression follows caption']['p']:.2f} (base "
            f"{base[cfg]['expression follows caption']['p']:.2f}), pose {r['pose follows caption']['p']:.2f} (base "
            f"{base[cfg]['pose follows caption']['p']:.2f})")
    for ok in (lambda r: r["noise_ratio"] <= 1.1 and r["scene_ok"], lambda r: r["noise_ratio"] <= 1.1, lambda r: True):
        pool = [r for r in results if ok(r)]
        if pool:
            best = max(pool, key=lambda r: r["retrieval"]["p"])
            break
    chosen = {k: best[k] for k in ("cfg", "uncond", "weight", "end_at")}
    gen.cfg, gen.uncond, gen.weight, gen.end_at = (chosen[k] for k in ("cfg", "uncond", "weight", "end_at"))
    log(f"sweep: chose {chosen}")
    return {"settings": results, "base": {str(k): v for k, v in base.items()}, "chosen": chosen,
            "identities": n_ids, "pictures_per_setting": n_ids * per}


def evaluate(s, gen, train_ids):
    """Every figure of the report on EVALUATION identities (fresh draws), captions from held-out scenes, seeds never
    used in training; one run, with the defaults the validation sweep chose."""
    import domain as D
    import fit as F
    per = 2
    n_ids = s["samples"] // per
    candidates = D.identities("candidates", 99)
    ev = D.identities("evaluation", n_ids)
    truths = [i for i in ev for _ in range(per)]
    res, grid = {}, {}

    # (a) transfer: references in varied expressions, poses and backgrounds; each caption asks for another of each
    refs, ref_scenes, captions, scenes = transfer_inputs(ev, per, 10_000)
    ref_per_pic = [rs for rs in ref_scenes for _ in range(per)]
    with_id = generate(gen, [[r] for r in refs], captions, 20_000)
    plain = generate(gen, [[r] for r in refs], captions, 20_000, with_identity=False)
    reads_w, reads_0 = F.fit(with_id), F.fit(plain)
    hits_w = retrieval_hits(reads_w, truths, candidates)
    hits_0 = retrieval_hits(reads_0, truths, candidates)
    err_w, err_0 = errors(reads_w, truths), errors(reads_0, truths)
    hf_w, hf_0 = flat_hf(with_id, reads_w), flat_hf(plain, reads_0)
    res["transfer"] = {
        "retrieval with adapter": rate(hits_w), "retrieval without adapter": rate(hits_0),
        "errors with adapter": {k: mean_se(v) for k, v in err_w.items()},
        "errors without adapter": {k: mean_se(v) for k, v in err_0.items()},
        "error ratio": {k: float(np.mean(err_w[k]) / np.mean(err_0[k])) for k in err_w},
        "scene with adapter": scene_rates(reads_w, scenes, ref_per_pic),
        "scene without adapter (base model)": scene_rates(reads_0, scenes, ref_per_pic),
        "flat-region noise": {"with": float(np.nanmean(hf_w)), "without": float(np.nanmean(hf_0)),
                              "ratio": float(np.nanmean(hf_w) / np.nanmean(hf_0))},
        "identities": n_ids, "pictures": len(truths)}
    # the same pictures in MultiID-Bench's terms: Sim(Ref), Sim(GT) and copy-paste, the ground truth being the
    # reference's identity in the caption's scene, known exactly here
    from idfusion_pack.idfusion import metrics as M
    lit = {}
    for label, reads in (("with adapter", reads_w), ("without adapter", reads_0)):
        sims_r, sims_t, cps = [], [], []
        for r, t, sc, rs in zip(reads, truths, scenes, ref_per_pic):
            g = embedding(r["identity"], r["expression"], r["turn"])
            gt = embedding(t, sc["expression"], D.POSES[sc["pose"]] * 1.0)
            ref = embedding(t, rs["expression"], D.POSES[rs["pose"]] * 1.0)
            sims_r.append(M.cosine(g, ref))
            sims_t.append(M.cosine(g, gt))
            cps.append(M.copy_paste(g, gt, ref))
        lit[label] = {"Sim(Ref)": mean_se(sims_r), "Sim(GT)": mean_se(sims_t), "M_CP": mean_se(cps)}
    res["transfer"]["MultiID-Bench terms"] = lit
    log("MultiID-Bench terms: " + json.dumps({k: {m: round(x["mean"], 3) for m, x in v.items()} for k, v in lit.items()}))
    for i in range(min(6, n_ids)):
        grid[f"transfer {i}"] = (refs[i], D.to_uint8(with_id[i * per:(i + 1) * per]), D.to_uint8(plain[i * per:(i + 1) * per]))
    log(f"transfer: retrieval {rate(hits_w)['p']:.3f} with, {rate(hits_0)['p']:.3f} without; error ratios " +
        ", ".join(f"{k} {v:.2f}" for k, v in res["transfer"]["error ratio"].items()))

    # (b) nuisance in the reference: the same identities, captions and seeds, the reference drawn differently
    r2 = np.random.default_rng(11_000)
    far = r2.uniform(0.05, 0.07, (n_ids, 1, 2)) * r2.choice([-1, 1], (n_ids, 1, 2))
    variants = {"jitter past the training range": reference_drawings(ev, r2, ref_scenes, jitter=far)[0],
                "pixel noise sd 12": reference_drawings(ev, np.random.default_rng(10_000), ref_scenes, noise_sd=12.0)[0],
                "background outside the set": reference_drawings(
                    ev, r2, ref_scenes, backgrounds=[off_set_background(r2) for _ in ev])[0]}
    res["nuisance"] = {}
    for name, nrefs in variants.items():
        pics = generate(gen, [[r] for r in nrefs], captions, 20_000)
        hits = retrieval_hits(F.fit(pics), truths, candidates)
        res["nuisance"][name] = {"retrieval": rate(hits), "cost against clean references": paired(hits_w, hits)}
        grid[f"nuisance: {name}"] = (nrefs[0], D.to_uint8(pics[:per]), None)
        log(f"nuisance {name}: retrieval {rate(hits)['p']:.3f}")

    # (c) extrapolation: hair from a hue band no training identity has
    ex = D.identities("extrapolation", n_ids)
    xrefs, _ = reference_drawings(ex, np.random.default_rng(12_000))
    xcaps = [[D.caption(D.random_scene_from(np.random.default_rng(12_100 + i), held_out=True)) for _ in range(per)]
             for i in range(n_ids)]
    xpics = generate(gen, [[r] for r in xrefs], xcaps, 30_000)
    xreads = F.fit(xpics)
    xtruths = [i for i in ex for _ in range(per)]
    closer, in_band = [], []
    train_vecs = np.stack([D.identity_vector(t) for t in train_ids]) / F.SCALE
    for r, t in zip(xreads, xtruths):
        v = D.identity_vector(r["identity"]) / F.SCALE
        d_train = np.linalg.norm(train_vecs - v, axis=1).min()
        closer.append(F.distance(r["identity"], [t])[0] < d_train)
        in_band.append(bool(D.in_band(D.hue(r["identity"]["hair"]))))
    res["extrapolation"] = {"closer to the reference than to any training identity": rate(closer),
                            "hair hue read inside the band": rate(in_band),
                            "errors": {k: mean_se(v) for k, v in errors(xreads, xtruths).items()},
                            "band": list(D.HAIR_HUE_BAND)}
    for i in range(min(4, n_ids)):
        grid[f"extrapolation {i}"] = (xrefs[i], D.to_uint8(xpics[i * per:(i + 1) * per]), None)
    log(f"extrapolation: closer {rate(closer)['p']:.3f}, hue in band {rate(in_band)['p']:.3f}")

    # (d) two identities in one picture, left and right regions (Eq. 7 masks)
    W, P = 2 * D.SIZE, D.SIZE * gen.codec.pool   # masks at the size of the pictures a user sees
    left = torch.zeros(1, P, 2 * P)
    left[..., :P] = 1
    masks = torch.cat([left, 1 - left])
    own, partner, leaks, confs = [], [], [], []
    r4 = np.random.default_rng(13_000)
    two_pics = []
    for p in range(n_ids):
        a, b = ev[p], ev[(p + 1) % n_ids]
        ids = [gen.identity([reference_drawings([x], r4)[0][0]]) for x in (a, b)]
        caps = [D.caption(D.random_scene(r4), two=True) for _ in range(per)]
        x = gen.sample(gen.apply_regions(ids, masks), caps, seed=40_000 + p, width=W)
        two_pics.append(x)
        halves = F.fit(torch.cat([x[..., : D.SIZE], x[..., D.SIZE:]]))
        for h, r in enumerate(halves):
            mine, other = (a, b) if h < per else (b, a)
            d = F.distance(r["identity"], [mine, other] + candidates[:98])
            own.append(int(d.argmin()) == 0)
            partner.append(int(d.argmin()) == 1)
        for j in range(per):   # each picture's two faces against the two references (identity part only)
            vec = lambda ident: (D.identity_vector(ident) - F.MEAN) / F.SCALE   # noqa: E731
            sim = M.similarity_matrix([vec(halves[j]["identity"]), vec(halves[per + j]["identity"])], [vec(a), vec(b)])
            leaks.append(M.leakage(sim))
            confs += [c for c in M.id_conf(sim) if c is not None]
    res["two identities"] = {"half shows its own": rate(own), "half shows the partner": rate(partner),
                             "pictures": n_ids * per, "halves": len(own),
                             "MultiID-Bench leakage": mean_se([v for v in leaks if v is not None]),
                             "ID-Conf": mean_se(confs)}
    grid["two identities"] = (None, D.to_uint8(torch.cat(two_pics[:2])), None)
    log(f"two identities: own {rate(own)['p']:.3f}, partner {rate(partner)['p']:.3f}")

    # (e) three references in different poses against one (the facing-front one)
    r5 = np.random.default_rng(14_000)
    three = [reference_drawings([i] * 3, r5, [{**D.random_scene(r5), "pose": p} for p in D.POSES])[0] for i in ev]
    pics3 = generate(gen, three, captions, 50_000)
    pics1 = generate(gen, [[t[1]] for t in three], captions, 50_000)
    h3 = retrieval_hits(F.fit(pics3), truths, candidates)
    h1 = retrieval_hits(F.fit(pics1), truths, candidates)
    res["three references"] = {"three": rate(h3), "one": rate(h1), "three minus one": paired(h3, h1)}
    grid["three references"] = (np.concatenate(three[0], 1), D.to_uint8(pics3[:per]), D.to_uint8(pics1[:per]))
    log(f"three references: {rate(h3)['p']:.3f} against one {rate(h1)['p']:.3f}")
    return res, grid


def token_budget_study(s, gen, work, train_ids, base_key, all_adapter):
    """Issue 17 deliverable 4: an adapter trained with pooled reference tokens (2x2 at the highest-resolution layers,
    Apply's `reference_tokens` option) against the all-tokens adapter, on the transfer cell's exact pictures (same
    evaluation identities, references, captions and seeds), paired. Pooled becomes a candidate default only if its
    retrieval is within one standard error of all tokens."""
    import domain as D
    import fit as F
    src, info = train_adapter(s, work, gen.patcher, gen.clip, gen.codec, train_ids, base_key, reference_tokens="pooled")
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    per = 2
    n_ids = s["samples"] // per
    candidates = D.identities("candidates", 99)
    ev = D.identities("evaluation", n_ids)
    truths = [i for i in ev for _ in range(per)]
    refs, _, captions, _ = transfer_inputs(ev, per, 10_000)   # exactly the transfer cell's draws (evaluate, part a)
    out = {}
    hits = {}
    for label, adapter, tokens in (("all tokens (shipped adapter)", all_adapter, "all"),
                                   ("pooled, adapter trained pooled", IDFusionAdapter.load(src), "pooled"),
                                   ("pooled at inference only (shipped adapter)", all_adapter, "pooled")):
        gen.adapter, gen.reference_tokens = adapter, tokens
        pics = generate(gen, [[r] for r in refs], captions, 20_000)
        hits[label] = retrieval_hits(F.fit(pics), truths, candidates)
        out[label] = {"retrieval": rate(hits[label])}
        log(f"token budget, {label}: retrieval {out[label]['retrieval']['p']:.3f}")
    gen.adapter, gen.reference_tokens = all_adapter, "all"
    first = "all tokens (shipped adapter)"
    for label in list(out)[1:]:
        out[label]["against all tokens"] = paired(hits[label], hits[first])
    out["pooled adapter training"] = info
    return out


def save_grid(grid, path, scale=2):
    """One row per entry: reference(s) | generations with the adapter | (where given) the same seeds without it."""
    from PIL import Image, ImageDraw
    import domain as D
    rows = []
    for name, (ref, gen_, plain) in grid.items():
        h = gen_.shape[1]
        gap = np.full((h, 6, 3), 255, np.uint8)
        parts = [ref if ref is not None else np.full((h, D.SIZE, 3), 255, np.uint8), gap, np.concatenate(list(gen_), 1)]
        if plain is not None:
            parts += [gap, gap, np.concatenate(list(plain), 1)]
        rows.append((name, np.concatenate(parts, 1)))
    width = max(r.shape[1] for _, r in rows)
    label_w = 200
    canvas = Image.new("RGB", (label_w + width * scale, sum(r.shape[0] * scale + 4 for _, r in rows)), "white")
    d = ImageDraw.Draw(canvas)
    y = 0
    for name, r in rows:
        canvas.paste(Image.fromarray(r).resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST), (label_w, y))
        d.text((4, y + 4), name, fill="black")
        y += r.shape[0] * scale + 4
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def ship_references(folder, n=8, n_extrapolation=2):
    """Example references: fresh evaluation-split identities the models never saw, and extrapolation identities
    (hair hue outside every training identity's), smiling and facing front on grey, with their true parameters."""
    import domain as D
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        if old.endswith(".png"):
            os.remove(os.path.join(folder, old))
    scene = {"expression": "smiling", "pose": "facing front", "background": "grey"}
    listing = []
    groups = (("fresh", D.identities("evaluation", 1000)[-n:]), ("extrapolation", D.identities("extrapolation", 1000)[-n_extrapolation:]))
    for prefix, idents in groups:
        pics = D.to_uint8(D.render_batch([[i] for i in idents], [scene] * len(idents), np.zeros((len(idents), 1, 2)))[0])
        for i, (ident, pic) in enumerate(zip(idents, pics)):
            name = f"{prefix}_{i}.png"
            tmp = os.path.join(folder, f".{name}.tmp.png")
            Image.fromarray(D.upscale(pic)).save(tmp)
            os.replace(tmp, os.path.join(folder, name))
            listing.append({"file": name, "kind": prefix, "identity": D.to_json(ident), "scene": scene})
    write_text_atomic(os.path.join(folder, "identities.json"), json.dumps(
        {"about": "Reference faces for the demo and the workflows: identities drawn fresh (no model saw them in training), "
                  "and extrapolation identities whose hair hue lies in a band no training identity has "
                  f"({D.HAIR_HUE_BAND[0]:.0f}-{D.HAIR_HUE_BAND[1]:.0f} degrees). identity: CIELAB colours and shape "
                  "parameters as fractions of the picture size (benchmarks/synthetic/domain.py; make synthetic).",
         "references": listing}, indent=1))


def pct(r):
    return f"{100 * r['p']:.1f}% ± {100 * r['se']:.1f}"


def mse(r, unit=""):
    return f"{r['mean']:.2f}{unit} ± {r['se']:.2f}"


TARGETS = {"retrieval": "≥ 90% with the adapter (chance 1%); ≤ 3% without", "colour": "≤ 25% of the error without the adapter",
           "geometry": "≤ 30% of the error without the adapter", "extrapolation": "≥ 80%",
           "scene": "expression and pose ≥ the base model's rate − 2 points; background ≥ 99%",
           "copy": "≤ the base model's rate + 2 points", "noise": "≤ 1.1×", "nuisance": "costs ≤ 5 points of retrieval",
           "two": "≥ 95% / ≤ 2%", "three": "better by ≥ 2 SE"}


def write_report(out: dict, path: str, command: str):
    """The figures of one run as markdown tables (generated, so the numbers are the run's own)."""
    import domain as D
    r, cal, sw = out["results"], out["calibration"], out["sweep"]
    t = r["transfer"]
    yes = lambda ok: "met" if ok else "**missed**"   # noqa: E731
    L = [f"# Synthetic identity domain: {out['scale']} run", "",
         f"Generated by `{command}` on {out['date']} ({out['device']}, torch {out['torch']}, ComfyUI {out['comfyui']}); "
         f"stage times in seconds: {out['seconds']}. Every figure is measured on the shipped fp16 files, on evaluation "
         f"identities drawn fresh (no model saw them), with captions from held-out scenes and seeds never used in "
         f"training; ± is one standard error. Retrieval: among 100 candidates (the reference's identity and 99 other "
         f"fresh identities) the one nearest to what the instrument reads, in the identity space scaled by the prior's "
         f"spread per dimension (chance 1%).", "",
         f"Adapter training: {out['adapter_training']['steps']} steps, batch {out['adapter_training']['batch']}, "
         f"{out['adapter_training']['pictures']} pictures of {out['adapter_training']['identities']} training identities; "
         f"mean loss of the first 20 steps {out['adapter_training']['loss_first20']:.4f}, of the last 20 "
         f"{out['adapter_training']['loss_last20']:.4f}.", "",
         "## 1. The instrument's calibration (renderer fit; measured before any generation was read)", "",
         "| input (n = %d) | skin ΔE | hair ΔE | eyes ΔE | face width px | face height px | eye spacing px | eye size px | mouth width px | hair volume px | fringe px | expression | pose | background | retrieval |" % cal["clean drawings"]["retrieval"]["n"],
         "|---|" + "---|" * 14]
    for name, c in cal.items():
        L.append(f"| {name} | " + " | ".join(mse(c[k]) for k in ["skin", "hair", "eyes"] + list(D.GEOMETRY)) + " | " +
                 " | ".join(pct(c[f"{k} follows caption"]) for k in D.SCENE_ATTRS) + f" | {pct(c['retrieval'])} |")
    L += ["", "## 2. Shipped defaults: chosen on validation identities", "",
          f"{sw['identities']} validation identities, {sw['pictures_per_setting']} pictures per setting (a split of its own, "
          "never the evaluation identities). Rule fixed before the sweep: among settings with flat-region noise ratio ≤ 1.1 "
          "and expression and pose following within 5 points of the base model at that CFG, the highest retrieval.", "",
          "| CFG | uncond | weight | end_at | retrieval | noise ratio | expression follows | pose follows |",
          "|---|---|---|---|---|---|---|---|"]
    for s in sw["settings"]:
        L.append(f"| {s['cfg']} | {s['uncond']} | {s['weight']} | {s.get('end_at', 1.0)} | {pct(s['retrieval'])} | "
                 f"{s['noise_ratio']:.2f} | {pct(s['expression follows caption'])} | {pct(s['pose follows caption'])} |")
    L += ["", f"Chosen: CFG {sw['chosen']['cfg']}, uncond `{sw['chosen']['uncond']}`, weight {sw['chosen']['weight']}, "
              f"end_at {sw['chosen'].get('end_at', 1.0)}.", "",
          "## 3. Figures against the targets (evaluation identities)", "",
          "| measure | target | result | |", "|---|---|---|---|"]
    rw, r0 = t["retrieval with adapter"], t["retrieval without adapter"]
    L.append(f"| retrieval among 100 fresh candidates, n = {rw['n']} | {TARGETS['retrieval']} | {pct(rw)} with, {pct(r0)} without | "
             f"{yes(rw['p'] >= 0.9 and r0['p'] <= 0.03)} |")
    for k in ["skin", "hair", "eyes"]:
        ratio = t["error ratio"][k]
        L.append(f"| {k} colour error (ΔE) | {TARGETS['colour']} | {mse(t['errors with adapter'][k])} against "
                 f"{mse(t['errors without adapter'][k])}: {100 * ratio:.0f}% | {yes(ratio <= 0.25)} |")
    for k in D.GEOMETRY:
        ratio = t["error ratio"][k]
        L.append(f"| {k} error (px) | {TARGETS['geometry']} | {mse(t['errors with adapter'][k])} against "
                 f"{mse(t['errors without adapter'][k])}: {100 * ratio:.0f}% | {yes(ratio <= 0.30)} |")
    x = r["extrapolation"]["closer to the reference than to any training identity"]
    L.append(f"| extrapolation references: picture closer to the reference than to any of the {out['train_ids']} training "
             f"identities | {TARGETS['extrapolation']} | {pct(x)} | {yes(x['p'] >= 0.8)} |")
    sw_, s0 = t["scene with adapter"], t["scene without adapter (base model)"]
    for k in ("expression", "pose"):
        a, b = sw_[f"{k} follows caption"], s0[f"{k} follows caption"]
        L.append(f"| {k} follows the caption (reference in another {k}) | {TARGETS['scene']} | {pct(a)}; base model {pct(b)} | "
                 f"{yes(a['p'] >= b['p'] - 0.02)} |")
    a = sw_["background follows caption"]
    L.append(f"| background follows the caption | ≥ 99% | {pct(a)}; base model {pct(s0['background follows caption'])} | {yes(a['p'] >= 0.99)} |")
    for k in ("expression", "pose"):
        a, b = sw_[f"{k} copied from reference"], s0[f"{k} copied from reference"]
        L.append(f"| copy-paste: the reference's {k} though the caption asks another | {TARGETS['copy']} | {pct(a)}; base model "
                 f"{pct(b)} | {yes(a['p'] <= b['p'] + 0.02)} |")
    q = t["flat-region noise"]
    L.append(f"| high-frequency energy in flat regions, with against without the identity | {TARGETS['noise']} | "
             f"{q['ratio']:.2f}× ({q['with']:.1f} against {q['without']:.1f}) | {yes(q['ratio'] <= 1.1)} |")
    for name, v in r["nuisance"].items():
        c = v["cost against clean references"]
        L.append(f"| reference nuisance: {name} | {TARGETS['nuisance']} | retrieval {pct(v['retrieval'])}, cost "
                 f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} points | {yes(c['diff'] <= 0.05)} |")
    tw = r["two identities"]
    L.append(f"| two identities with masks: a half shows its own / the partner ({tw['halves']} halves) | {TARGETS['two']} | "
             f"{pct(tw['half shows its own'])} / {pct(tw['half shows the partner'])} | "
             f"{yes(tw['half shows its own']['p'] >= 0.95 and tw['half shows the partner']['p'] <= 0.02)} |")
    th = r["three references"]
    L.append(f"| three references in different poses against one | {TARGETS['three']} | {pct(th['three'])} against "
             f"{pct(th['one'])}: {th['three minus one']['in_se']:+.1f} SE | {yes(th['three minus one']['in_se'] >= 2)} |")
    lit = t["MultiID-Bench terms"]
    L += ["", "## 4. The same pictures in the literature's terms (issue 20)", "",
          "MultiID-Bench's Sim(Ref), Sim(GT) and copy-paste M_CP = (θ_gt − θ_gr)/θ_tr, and for two-person pictures its "
          "leakage and UMO's ID-Conf, computed with the pack's own metric functions (`idfusion/metrics.py`) on vectors "
          "built from what the instrument reads (run.py `embedding`: identity in prior units plus expression and head "
          "turn) in place of ArcFace embeddings. The ground truth t is the reference's identity in the caption's scene, "
          "known exactly here. M_CP is +1 for a copy of the reference, −1 for the ground truth.", "",
          "| | Sim(Ref) | Sim(GT) | M_CP |", "|---|---|---|---|"]
    L += [f"| {k} | {mse(v['Sim(Ref)'])} | {mse(v['Sim(GT)'])} | {mse(v['M_CP'])} |" for k, v in lit.items()]
    L += ["", f"Two identities with masks: leakage {mse(tw['MultiID-Bench leakage'])}, ID-Conf {mse(tw['ID-Conf'])}."]
    if "token budget" in out:
        tb = out["token budget"]
        L += ["", "## 5. The token budget, trained (`make synthetic-token-budget`)", "",
              "The transfer cell's exact pictures (same identities, references, captions and seeds), retrieval paired "
              "against the shipped all-tokens adapter. Pooled: 2x2 average pooling of h_f at the highest-resolution "
              "attention layers (Apply's `reference_tokens`).", "", "| variant | retrieval | against all tokens |", "|---|---|---|"]
        for label, v in tb.items():
            if "retrieval" in v:
                c = v.get("against all tokens")
                L.append(f"| {label} | {pct(v['retrieval'])} | " + (f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} points" if c else "") + " |")
    L += ["", f"Extrapolation: the hair hue read inside the band ({r['extrapolation']['band'][0]:.0f}-"
          f"{r['extrapolation']['band'][1]:.0f} degrees) in {pct(r['extrapolation']['hair hue read inside the band'])} "
          f"of the pictures; hair ΔE {mse(r['extrapolation']['errors']['hair'])}.", "",
          f"Image grid: `grid_{out['scale']}.png` (reference | with the adapter | same seeds without it).", ""]
    write_text_atomic(path, "\n".join(L))


def write_families(report: str):
    """docs/synthetic/families.md: the two families' figures side by side, each from its own results file (its own
    run; each column's n is its own). Rewritten after every official run; a family not yet built is left out."""
    import domain as D
    runs = {}
    for scale, label in (("cpu", "UNet"), ("flux-cpu", "Flux DiT")):
        path = os.path.join(report, f"results_{scale}.json")
        if os.path.isfile(path):
            with open(path) as f:
                runs[label] = json.load(f)
    if not runs:
        return
    rows = []   # (measure, target, {family: text})

    def row(name, target, get):
        cells = {}
        for label, out in runs.items():
            try:
                cells[label] = get(out)
            except (KeyError, TypeError, ZeroDivisionError):
                cells[label] = "-"
        rows.append((name, target, cells))

    cal = "base model img2img, denoise 0.5"
    row("instrument: retrieval on the base model's own img2img (calibration)", "-",
        lambda o: pct(o["calibration"][cal]["retrieval"]))
    row("instrument: eyes ΔE on the base model's own img2img", "-", lambda o: mse(o["calibration"][cal]["eyes"]))
    row("shipped defaults (chosen on validation identities)", "-",
        lambda o: "CFG {cfg}, `{uncond}`, weight {weight}, end_at {end_at}".format(**{"end_at": 1.0, **o["sweep"]["chosen"]}))
    row("retrieval among 100 fresh candidates, with the adapter", "≥ 90%",
        lambda o: f"{pct(o['results']['transfer']['retrieval with adapter'])} (n = {o['results']['transfer']['pictures']})")
    row("retrieval without the adapter", "≤ 3%", lambda o: pct(o["results"]["transfer"]["retrieval without adapter"]))
    for k in ["skin", "hair", "eyes"] + list(D.GEOMETRY):
        row(f"{k} error, with / without the adapter", "≤ 25%" if k in D.COLOURS else "≤ 30%",
            lambda o, k=k: f"{100 * o['results']['transfer']['error ratio'][k]:.0f}%")
    row("extrapolation: closer to the reference than to any training identity", "≥ 80%",
        lambda o: pct(o["results"]["extrapolation"]["closer to the reference than to any training identity"]))
    row("extrapolation: hair hue read inside the unseen band", "-",
        lambda o: pct(o["results"]["extrapolation"]["hair hue read inside the band"]))
    for k in ("expression", "pose"):
        row(f"{k} follows the caption: with the adapter / base model", "≥ base − 2 points",
            lambda o, k=k: f"{pct(o['results']['transfer']['scene with adapter'][f'{k} follows caption'])} / "
                           f"{pct(o['results']['transfer']['scene without adapter (base model)'][f'{k} follows caption'])}")
        row(f"copy-paste of the reference's {k}: with / base model", "≤ base + 2 points",
            lambda o, k=k: f"{pct(o['results']['transfer']['scene with adapter'][f'{k} copied from reference'])} / "
                           f"{pct(o['results']['transfer']['scene without adapter (base model)'][f'{k} copied from reference'])}")
    row("background follows the caption", "≥ 99%",
        lambda o: pct(o["results"]["transfer"]["scene with adapter"]["background follows caption"]))
    row("flat-region noise, with / without", "≤ 1.1×", lambda o: f"{o['results']['transfer']['flat-region noise']['ratio']:.2f}×")
    for name in ("jitter past the training range", "pixel noise sd 12", "background outside the set"):
        row(f"nuisance in the reference, {name}: cost in retrieval", "≤ 5 points",
            lambda o, n=name: "{:+.1f} ± {:.1f} points".format(
                100 * o["results"]["nuisance"][n]["cost against clean references"]["diff"],
                100 * o["results"]["nuisance"][n]["cost against clean references"]["se"]))
    row("two identities with masks: own / partner", "≥ 95% / ≤ 2%",
        lambda o: f"{pct(o['results']['two identities']['half shows its own'])} / "
                  f"{pct(o['results']['two identities']['half shows the partner'])}")
    row("three references against one", "≥ +2 SE",
        lambda o: f"{pct(o['results']['three references']['three'])} against {pct(o['results']['three references']['one'])} "
                  f"({o['results']['three references']['three minus one']['in_se']:+.1f} SE)")
    row("adapter training", "-", lambda o: f"{o['adapter_training']['steps']} steps, batch {o['adapter_training']['batch']}")
    row("stage times, s (base, adapter, calibration, sweep, evaluation)", "-",
        lambda o: ", ".join(str(o["seconds"].get(k, "-")) for k in ("base", "adapter", "calibration", "sweep", "evaluation")))
    labels = list(runs)
    L = ["# The two model families on the synthetic domain, side by side", "",
         "Generated by `benchmarks/synthetic/run.py` (`make synthetic`, `make synthetic-flux`) from each family's own "
         "results file in this folder: the same domain, training identities, instrument (renderer fit, calibrated in "
         "each run), evaluation code, seeds and targets; each family's shipped defaults chosen on validation identities "
         "by the same rule. The DiT is ComfyUI's own Flux class (`comfy.ldm.flux.model.Flux`) at a tiny width. ± is one "
         "standard error; n is each run's own; a stage reused from the cache shows its reuse time.", "",
         "| measure | target | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, target, cells in rows:
        L.append(f"| {name} | {target} | " + " | ".join(cells[l] for l in labels) + " |")
    L += ["", "Runs: " + "; ".join(f"{l}: {o['date']}, {o['device']}, torch {o['torch']}, ComfyUI {o['comfyui']}, report "
                                   f"`report_{o['scale']}.md`" for l, o in runs.items()), ""]
    write_text_atomic(os.path.join(report, "families.md"), "\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic"), help="cache for data and trained models")
    ap.add_argument("--models", default=None, help="where the shipped files go (default: the pack's models/ for "
                    "--scale cpu, <work>/models otherwise)")
    ap.add_argument("--report", default=None, help="where results, report and grid go (default docs/synthetic for cpu)")
    ap.add_argument("--stage", choices=["all", "token-budget"], default="all", help="token-budget: after a full run "
                    "(its stages cached in --work), train the pooled-token adapter and compare it on the transfer cell")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice); 1 is "
                    "faster on a machine other jobs share")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from train import load_pack   # scripts/train.py: loads ComfyUI and this pack as idfusion_pack
    load_pack(args.comfyui, cpu=device.type == "cpu")
    import comfyui_version
    import domain as D
    from idfusion_pack.idfusion import synthetic
    s = SCALES[args.scale]
    official = args.scale in OFFICIAL
    flux = s.get("arch") == "flux"
    models = args.models or (os.path.join(ROOT, "models") if official else os.path.join(args.work, "models"))
    report = args.report or (os.path.join(ROOT, "docs", "synthetic") if official else os.path.join(args.work, "report"))
    for d in (args.work, report, os.path.join(models, "idfusion")):
        os.makedirs(d, exist_ok=True)
    stem = "synthetic_faces_flux" if flux else "synthetic_faces"
    base_path = os.path.join(models, f"{stem}.safetensors")
    adapter_path = os.path.join(models, "idfusion", f"{stem}_adapter.safetensors")
    command = OFFICIAL.get(args.scale) or f"benchmarks/synthetic/run.py --scale {args.scale}"
    t0 = time.time()
    timings = {}
    train_ids = D.identities("training", s["train_ids"])
    if args.stage == "token-budget" and flux:
        raise SystemExit("the token-budget stage is run on the UNet family (--scale cpu)")
    if args.stage == "token-budget":   # on top of a finished run: its shipped files and results stay as they are
        from idfusion_pack.idfusion.adapter import IDFusionAdapter
        patcher, clip, codec, _ = synthetic.load(base_path)
        adapter = IDFusionAdapter.load(adapter_path)
        path = os.path.join(report, f"results_{args.scale}.json")
        with open(path) as f:
            out = json.load(f)
        gen = Generator(patcher, clip, codec, adapter, s["eval_steps"], **out["sweep"]["chosen"])
        out["token budget"] = token_budget_study(s, gen, args.work, train_ids, key(base_phases(s)[-1]), adapter)
        out["seconds"]["token budget"] = round(time.time() - t0)
        write_text_atomic(path, json.dumps(out, indent=1))
        write_report(out, os.path.join(report, f"report_{args.scale}.md"), command)
        log(f"token budget study done in {time.time() - t0:.0f}s: {path}")
        return
    unet_state, text_state, settings = train_base(s, args.work, device)
    ship_base(base_path, unet_state, text_state, settings)
    patcher, clip, codec, _ = synthetic.load(base_path)     # from here on: the shipped fp16 weights
    timings["base"] = time.time() - t0
    src, train_info = train_adapter(s, args.work, patcher, clip, codec, train_ids, key(settings))
    adapter = ship_adapter(src, adapter_path, train_info)
    timings["adapter"] = time.time() - t0 - sum(timings.values())
    gen = Generator(patcher, clip, codec, adapter, s["eval_steps"])
    candidates = D.identities("candidates", 99)
    per = 2
    calibration, cal_pics = calibrate(gen, s["samples"] // per, per, candidates)
    timings["calibration"] = time.time() - t0 - sum(timings.values())
    sweep_out = sweep(gen, max(2, s["samples"] // 8), per, candidates)
    timings["sweep"] = time.time() - t0 - sum(timings.values())
    res, grid = evaluate(s, gen, train_ids)
    grid = {**{f"calibration: {k}": (None, D.to_uint8(v), None) for k, v in cal_pics.items()}, **grid}
    timings["evaluation"] = time.time() - t0 - sum(timings.values())
    save_grid(grid, os.path.join(report, f"grid_{args.scale}.png"))
    out = {"scale": args.scale, "settings": s, "device": str(device), "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "comfyui": comfyui_version.__version__, "date": time.strftime("%Y-%m-%d"), "train_ids": s["train_ids"],
           "adapter_training": train_info, "calibration": calibration, "sweep": sweep_out, "results": res,
           "seconds": {k: round(v) for k, v in timings.items()}}
    path = os.path.join(report, f"results_{args.scale}.json")
    write_text_atomic(path, json.dumps(out, indent=1))
    write_report(out, os.path.join(report, f"report_{args.scale}.md"), command)
    # the measured figures travel with the shipped files
    t = res["transfer"]
    figures = {"date": out["date"], "retrieval_chance": 0.01, "n": t["pictures"],
               "retrieval": {"with adapter": round(t["retrieval with adapter"]["p"], 4),
                             "without adapter": round(t["retrieval without adapter"]["p"], 4)},
               "extrapolation_closer_than_training": round(res["extrapolation"]["closer to the reference than to any training identity"]["p"], 4),
               "report": "docs/synthetic_identity.md"}
    ship_base(base_path, unet_state, text_state, settings, figures)
    ship_adapter(src, adapter_path, train_info, figures, sweep_out["chosen"])
    if official:
        write_families(report)
    if not flux:   # the DiT family is measured on the same shipped references
        ship_references(os.path.join(ROOT, "workflows", "assets", "synthetic") if official else os.path.join(models, "references"))
    log(f"done in {time.time() - t0:.0f}s: {path}")


if __name__ == "__main__":
    main()
