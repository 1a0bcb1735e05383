"""Build the pack's embedded model and prove on it that identity transfers (issue 9).

    make synthetic            # or: .hosts/0.3.75/venv/bin/python benchmarks/synthetic/run.py [--scale cpu|smoke]

Stages (each cached in --work, keyed by its settings, so a re-run reuses what did not change):
1. draw procedural faces (benchmarks/synthetic/domain.py);
2. train the tiny base model (idfusion/synthetic.py: ComfyUI's UNetModel on 4x4 space-to-depth patches, and a
   word-level text encoder) on captions that describe expression, pose and background but never the identity;
   ship it as models/synthetic_faces.safetensors (fp16);
3. train an attribute classifier on drawn faces, the measuring instrument (models/classifier/);
4. train the adapter with this pack's Trainer on every identity but the 8 evaluation ones, the reference being
   another picture of the same identity, with captions from 36 of the 48 scenes; ship it as
   models/idfusion/synthetic_faces_adapter.safetensors (fp16);
5. from the shipped (fp16) files, generate through this pack's nodes (Encode Reference, Apply, Apply
   Multi-Identity, Merge References) and ComfyUI's sampler, and measure base quality and (a)-(d) on the 8 unseen
   identities with the 12 held-out scenes' captions and seeds never used in training. Report, figures, image grid
   and contact sheet go to --report; the figures are also written into the shipped files' metadata.
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

SCALES = {
    "cpu": dict(base_steps=4000, base_batch=32, channels=64, pred="x0", clf_steps=600, train_ids=0, per_id=12,
                adapter_steps=2000, adapter_batch=16, samples=16, eval_steps=20),
    "smoke": dict(base_steps=20, base_batch=8, channels=32, pred="x0", clf_steps=20, train_ids=16, per_id=2,
                  adapter_steps=4, adapter_batch=4, samples=2, eval_steps=3),   # wiring check only
}
N_EVAL = 8       # unseen identities (chance = 1/8)
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


def split_identities(s):
    """8 evaluation identities, pairwise at least 2 attributes apart; the adapter trains on the others (all of
    them at --scale cpu, so it has to learn to copy attributes, not to remember faces)."""
    import domain as D
    unseen = D.identities(N_EVAL, seed=SEED)
    rest = [c for c in D.every_identity() if c not in unseen]
    train = rest[: s["train_ids"]] if s["train_ids"] else rest
    return train, unseen


# ---- stage 1-2: base model ---------------------------------------------------------------------
def render_pool(n_single, n_double, seed):
    import domain as D
    rng = np.random.default_rng(seed)
    combos = D.every_identity()   # the base model is generic
    singles, s_caps, doubles, d_caps = [], [], [], []
    for _ in range(n_single):
        scene = D.random_scene(rng)
        singles.append(D.render([combos[rng.integers(len(combos))]], scene, rng)[0])
        s_caps.append(D.caption(scene))
    for _ in range(n_double):
        scene = {**D.random_scene(rng), "pose": "facing front"}
        a, b = rng.choice(len(combos), 2, replace=False)
        doubles.append(D.render([combos[a], combos[b]], scene, rng)[0])
        d_caps.append(D.caption(scene, two=True))
    return D.to_tensor(singles), s_caps, D.to_tensor(doubles), d_caps


def base_settings(s):
    import domain as D
    from idfusion_pack.idfusion import synthetic
    unet = synthetic.unet_config(3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, s["channels"])
    return {"base_steps": s["base_steps"], "base_batch": s["base_batch"], "prediction": s["pred"], "unet": unet,
            "codec": {"pool": D.POOL, "factor": D.FACTOR}, "text": {"dim": unet["context_dim"], "length": 16},
            "vocabulary": D.vocabulary(), "lr": 1e-3, "ema": 0.999, "seed": SEED, "v": 2}


def train_base(s, work, device):
    """-> (unet_state, text_state, settings): trained weights (fp32), cached in work."""
    import domain as D
    from idfusion_pack.idfusion import synthetic
    from idfusion_pack.idfusion.adapter import read_safetensors, save_safetensors_atomic
    settings = base_settings(s)
    path = os.path.join(work, f"base-{key(settings)}.safetensors")
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, "idfusion.synthetic_base", "synthetic base model")
        log(f"base model: reused {path}")
        return ({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")},
                {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}, settings)
    torch.manual_seed(SEED)
    unet = settings["unet"]
    patcher = synthetic.build_patcher(unet, prediction=s["pred"])
    from random_models import randomize_
    randomize_(patcher.model.diffusion_model, SEED)
    with torch.no_grad():   # a zero output layer: the untrained model predicts the mean, a stable start
        for p in patcher.model.diffusion_model.out[-1].parameters():
            p.zero_()
    model = patcher.model.to(device)
    vocab = settings["vocabulary"]
    text = synthetic.WordEncoder(len(vocab), settings["text"]["dim"], settings["text"]["length"]).to(device)
    tok = synthetic.WordTokenizer(tokenizer_data={"vocabulary": vocab, "length": settings["text"]["length"]})
    tokens = lambda texts: torch.tensor([[p[0] for p in tok.tokenize_with_weights(t)["words"][0]] for t in texts])
    singles, s_caps, doubles, d_caps = render_pool(6000, 2000, seed=1)
    singles, doubles = D.to_latent(singles), D.to_latent(doubles)
    ms = model.model_sampling
    params = list(model.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(SEED)
    t0, B = time.time(), s["base_batch"]
    model.train()
    for step in range(s["base_steps"]):
        for group in opt.param_groups:
            group["lr"] = settings["lr"] * D.cosine_lr(step, s["base_steps"], 100)
        two = step % 4 == 3                       # one batch in four: two people side by side
        pool, caps = (doubles, d_caps) if two else (singles, s_caps)
        idx = torch.randint(len(pool), (B // 2 if two else B,), generator=g)
        x0 = pool[idx].to(device)
        texts = [caps[i] if torch.rand(1, generator=g) > 0.1 else "" for i in idx.tolist()]   # 10% unconditional
        ctx = text(tokens(texts).to(device))
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g).float()
        sigma = ms.sigma(t).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        denoised = model.apply_model(ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0), sigma, c_crossattn=ctx)
        # the same weighting for either parametrisation: v-prediction's MSE, in x0 space
        weight = (sigma ** 2 + 1) / sigma ** 2
        loss = (((denoised - x0) ** 2) * weight.view(-1, 1, 1, 1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(settings["ema"], (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 100 == 0 or step == s["base_steps"] - 1:
            log(f"base step {step + 1}/{s['base_steps']} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet_state = {k: v.detach().cpu().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    text_state = {k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()}
    tensors = {**{f"unet.{k}": v for k, v in unet_state.items()}, **{f"text.{k}": v for k, v in text_state.items()}}
    save_safetensors_atomic(tensors, path, {"format": "idfusion.synthetic_base", "settings": json.dumps(settings),
                                            "seconds": f"{time.time() - t0:.0f}"})
    log(f"base model: trained in {time.time() - t0:.0f}s -> {path}")
    return unet_state, text_state, settings


def ship_base(path, unet_state, text_state, settings, figures=None):
    from idfusion_pack.idfusion import synthetic
    info = {"prediction": settings["prediction"],
            "training": {k: settings[k] for k in ("base_steps", "base_batch", "lr", "ema")},
            "seed": str(SEED), "rebuild": "make synthetic"}
    if figures:
        info["figures"] = figures
    synthetic.save(path, settings["unet"], unet_state, text_state, settings["vocabulary"], settings["text"]["length"],
                   synthetic.PixelCodec(**settings["codec"]), info)


# ---- stage 3: classifier -----------------------------------------------------------------------
def train_classifier(s, work, device, ship_path):
    import domain as D
    from idfusion_pack.idfusion.adapter import read_safetensors, save_safetensors_atomic
    settings = {"clf_steps": s["clf_steps"], "v": 2, "domain": D.PICTURE}
    path = os.path.join(work, f"classifier-{key(settings)}.safetensors")
    clf = D.AttributeClassifier()

    def labelled(n, seed):
        rng = np.random.default_rng(seed)
        combos = D.every_identity()
        ims, labels = [], {k: [] for k in D.ALL_ATTRS}
        for _ in range(n):
            ident, scene = combos[rng.integers(len(combos))], D.random_scene(rng)
            ims.append(D.render([ident], scene, rng)[0])
            for k, v in {**ident, **scene}.items():
                labels[k].append(D.ALL_ATTRS[k].index(v))
        return D.to_tensor(ims), {k: torch.tensor(v) for k, v in labels.items()}

    test_x, test_y = labelled(1000, seed=3)
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, "idfusion.synthetic_classifier", "attribute classifier")
        clf.load_state_dict(tensors)
        log(f"classifier: reused {path}")
    else:
        x, y = labelled(8000, seed=2)
        clf.to(device).train()
        opt = torch.optim.AdamW(clf.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(SEED)
        t0 = time.time()
        for step in range(s["clf_steps"]):
            for group in opt.param_groups:
                group["lr"] = 2e-3 * D.cosine_lr(step, s["clf_steps"], 50)
            idx = torch.randint(len(x), (128,), generator=g)
            # robust to what a sampler leaves behind: a little noise and blur
            xb = x[idx] + torch.randn(x[idx].shape, generator=g) * 0.1 * torch.rand(len(idx), 1, 1, 1, generator=g)
            if step % 2:
                xb = torch.nn.functional.avg_pool2d(xb, 3, 1, 1)
            out = clf(xb.to(device))
            loss = sum(torch.nn.functional.cross_entropy(out[k], y[k][idx].to(device)) for k in out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        clf.eval().cpu()
        save_safetensors_atomic({k: v.contiguous() for k, v in clf.state_dict().items()}, path,
                                {"format": "idfusion.synthetic_classifier"})
        log(f"classifier: trained in {time.time() - t0:.0f}s")
    clf.eval().cpu().requires_grad_(False)
    save_safetensors_atomic({k: v.half().contiguous() for k, v in clf.state_dict().items()}, ship_path,
                            {"format": "idfusion.synthetic_classifier", "family": "synthetic_faces",
                             "attributes": json.dumps(D.ALL_ATTRS), "input": "32x32 RGB in [-1, 1]",
                             "training": json.dumps(settings), "seed": str(SEED)})
    clf.load_state_dict({k: v.half().float() for k, v in clf.state_dict().items()})   # measure with what ships
    lp = clf.log_probs(test_x)
    acc = {k: float((lp[k].argmax(1) == test_y[k]).float().mean()) for k in lp}
    log("classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return clf, acc


# ---- stage 4: adapter --------------------------------------------------------------------------
def write_dataset(folder, idents, per_id, seed):
    """Pictures at the size ComfyUI sees (PICTURE px), captions from the 36 training scenes only."""
    import domain as D
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i, ident in enumerate(idents):
        d = os.path.join(folder, f"id{i:03d}")
        os.makedirs(d, exist_ok=True)
        for j in range(per_id):
            scene = D.random_scene_from(rng, held_out=False)
            im, mask = D.render([ident], scene, rng)
            Image.fromarray(D.upscale(im)).save(os.path.join(d, f"{j:03d}.png"))
            Image.fromarray(D.upscale((mask * 255).astype(np.uint8)[..., None])[..., 0]).save(os.path.join(d, f"{j:03d}_mask.png"))
            with open(os.path.join(d, f"{j:03d}.txt"), "w") as f:
                f.write(D.caption(scene))


def train_adapter(s, work, patcher, clip, codec, train_idents, base_key):
    import domain as D
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    cfg = TrainConfig(steps=s["adapter_steps"], batch_size=s["adapter_batch"], lr=1e-3, warmup_steps=20,
                      save_every=max(50, s["adapter_steps"] // 4), seed=SEED, init="attn1", reference="other image",
                      reference_dropout=0.1, face_loss_weight=1.0, encoding="cached", timestep=0,
                      gradient_checkpointing=False)  # 32 px: memory is no concern, recompute would cost time
    settings = {"cfg": cfg.__dict__, "ids": len(train_idents), "per_id": s["per_id"], "base": base_key, "v": 2}
    out = os.path.join(work, f"adapter-{key(settings)}")
    data = os.path.join(out, "data")
    if not os.path.isdir(data):
        write_dataset(data + ".tmp", train_idents, s["per_id"], seed=5)
        os.replace(data + ".tmp", data)
    ds = FaceDataset(data, D.PICTURE)
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
                                  "reference_dropout": cfg.reference_dropout, "face_loss_weight": cfg.face_loss_weight,
                                  "init": cfg.init, "encoding": cfg.encoding, "seed": cfg.seed}


def ship_adapter(src, dst, info, figures=None):
    from idfusion_pack.idfusion.adapter import IDFusionAdapter, save_safetensors_atomic
    adapter = IDFusionAdapter.load(src)
    meta = {**adapter.metadata(), "family": "synthetic_faces", "training": json.dumps(info), "seed": str(SEED),
            "training_steps": str(info["steps"]), "rebuild": "make synthetic"}
    if figures:
        meta["figures"] = json.dumps(figures)
    save_safetensors_atomic({k: v.half() for k, v in adapter.state_tensors().items()}, dst, meta)
    return IDFusionAdapter.load(dst)


# ---- stage 5: generation through the nodes ------------------------------------------------------
def node_call(node, fn, *args, **kwargs):
    """Call a node as ComfyUI does (under inference mode); return its outputs tuple."""
    with torch.inference_mode():
        r = getattr(node, fn)(*args, **kwargs)
    return r["result"] if isinstance(r, dict) else r


class Generator:
    def __init__(self, patcher, clip, codec, adapter, steps):
        import domain as D
        import idfusion_pack
        self.D, self.patcher, self.clip, self.codec, self.adapter, self.steps = D, patcher, clip, codec, adapter, steps
        self.nodes = {k: v() for k, v in idfusion_pack.NODE_CLASS_MAPPINGS.items()}

    def identity(self, drawings: list[np.ndarray], name="ref"):
        images = torch.from_numpy(self.D.upscale(np.stack(drawings))).float() / 255.0
        return node_call(self.nodes["IDFusionEncodeReference"], "encode", self.patcher, self.codec, images, 0, name)[0]

    def apply(self, identity, weight=1.0):
        return node_call(self.nodes["IDFusionApply"], "apply", self.patcher, self.adapter, identity, weight, 0.0, 1.0,
                         "text only", "cached")[0]

    def apply_regions(self, idents, masks):
        kw = {f"identity_{i + 1}": x for i, x in enumerate(idents)}
        return node_call(self.nodes["IDFusionApplyMultiIdentity"], "apply", self.patcher, self.adapter, masks, 1.0,
                         0.0, 1.0, "text only", "cached", **kw)[0]

    def merge(self, a, b):
        return node_call(self.nodes["IDFusionMergeIdentities"], "merge", a, b)[0]

    def encode_text(self, captions):
        with torch.inference_mode():
            return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(c)) for c in captions])

    def sample(self, model, captions, seed, width=None):
        """-> drawings (B, 3, 32, W) in [-1, 1]: decoded and pooled back to the model's resolution."""
        import comfy.sample
        D = self.D
        width = width or D.SIZE
        latent = torch.zeros(len(captions), 3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, width // D.FACTOR)
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent, seed)
            pos = [[self.encode_text(captions), {}]]
            neg = [[self.encode_text([""]), {}]]
            x = comfy.sample.sample(model, noise, self.steps, CFG, "euler", "normal", pos, neg, latent, seed=seed,
                                    disable_pbar=True)
            pictures = self.codec.decode(x).movedim(-1, 1)
            return torch.nn.functional.avg_pool2d(pictures, D.POOL) * 2 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def rate(hits: list) -> dict:
    p = float(np.mean(hits))
    return {"p": p, "se": se(p, len(hits)), "n": len(hits)}


def laplacian_energy(x: torch.Tensor) -> float:
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return float(torch.nn.functional.conv2d(x.float(), k, groups=3).pow(2).mean())


def base_quality(gen, clf, n=128):
    """The base model alone (no adapter): grain = Laplacian energy of its samples over that of drawn faces of the same
    scenes (1 = as clean as a drawing), and how often the classifier reads the caption's scene in the sample."""
    D = gen.D
    rng = np.random.default_rng(9000)
    scenes = [D.random_scene_from(rng, held_out=True) for _ in range(n)]
    combos = D.every_identity()
    drawn = D.to_tensor([D.render([combos[rng.integers(len(combos))]], sc, rng)[0] for sc in scenes])
    xs = torch.cat([gen.sample(gen.patcher, [D.caption(sc) for sc in scenes[i:i + 32]], seed=9000 + i)
                    for i in range(0, n, 32)])
    lp = clf.log_probs(xs)
    out = {"grain_ratio": laplacian_energy(xs) / laplacian_energy(drawn), "n": n}
    for k in D.SCENE_ATTRS:
        out[f"{k}_follows_caption"] = rate([D.ALL_ATTRS[k][j] == sc[k] for j, sc in zip(lp[k].argmax(1).tolist(), scenes)])
    return out, to_uint8(xs[:8])


def evaluate(s, gen, clf, seen, unseen):
    """(a)-(d) on identities the adapter never saw, captions from held-out scenes, fresh seeds. An identity is
    'recognised' when it is the most likely of the N_EVAL candidates under the classifier (chance 1/N_EVAL)."""
    D = gen.D
    n = s["samples"]
    res, grid = {}, {}

    def classify(x, candidates):
        lp = clf.log_probs(x)
        return lp, D.identity_scores(lp, candidates)

    # (a) identity accuracy with and without the adapter (weight 0 returns the model unpatched)
    for set_name, cands in (("unseen", unseen), ("seen", seen)):
        hits = {"adapter": [], "no adapter": []}
        attr_hits = {k: [] for k in D.IDENTITY_ATTRS}
        for i, ident in enumerate(cands):
            rng = np.random.default_rng(10_000 + i + (500 if set_name == "seen" else 0))
            ref = D.render([ident], D.random_scene_from(rng, held_out=True), rng)[0]
            caps = [D.caption(D.random_scene_from(rng, held_out=True)) for _ in range(n)]
            seed = 20_000 + i + (500 if set_name == "seen" else 0)
            with_id = gen.sample(gen.apply(gen.identity([ref])), caps, seed=seed)
            plain = gen.sample(gen.patcher, caps, seed=seed)
            for label, x in (("adapter", with_id), ("no adapter", plain)):
                lp, sc = classify(x, cands)
                hits[label] += (sc.argmax(1) == i).tolist()
                if label == "adapter":
                    for k in D.IDENTITY_ATTRS:
                        attr_hits[k] += (lp[k].argmax(1) == D.ALL_ATTRS[k].index(ident[k])).tolist()
            grid[f"a/{set_name}/{i}"] = (ref, to_uint8(with_id[:6]), to_uint8(plain[:6]))
        res[f"a_{set_name}"] = {"with adapter": rate(hits["adapter"]), "without adapter": rate(hits["no adapter"]),
                                "attributes_with_adapter": {k: rate(v) for k, v in attr_hits.items()}}
        log(f"(a) {set_name}: {json.dumps({k: round(v['p'], 3) for k, v in res[f'a_{set_name}'].items() if 'p' in v})}")

    cands = unseen
    # (b) caption against reference: the reference smiles, faces front, on one background; the caption asks for
    # another expression, another pose and another background (the paper's "Cry" claim)
    follow = {f"{k} {w}": [] for k in D.SCENE_ATTRS for w in ("caption", "reference")}
    follow["identity"], follow["any copied"] = [], []
    for i, ident in enumerate(cands):
        rng = np.random.default_rng(30_000 + i)
        ref_scene = {"expression": "smiling", "pose": "facing front", "background": D.SCENE_ATTRS["background"][i % 4]}
        ref = D.render([ident], ref_scene, rng)[0]
        scenes = [D.random_scene_from(rng, held_out=True, **{k: ("not", v) for k, v in ref_scene.items()}) for _ in range(n)]
        x = gen.sample(gen.apply(gen.identity([ref])), [D.caption(sc) for sc in scenes], seed=40_000 + i)
        lp, sc_id = classify(x, cands)
        copied = np.zeros(n, bool)
        for k in D.SCENE_ATTRS:
            pred = [D.ALL_ATTRS[k][j] for j in lp[k].argmax(1).tolist()]
            follow[f"{k} caption"] += [p == sc[k] for p, sc in zip(pred, scenes)]
            follow[f"{k} reference"] += [p == ref_scene[k] for p in pred]
            copied |= np.array([p == ref_scene[k] for p in pred])
        follow["any copied"] += copied.tolist()
        follow["identity"] += (sc_id.argmax(1) == i).tolist()
        if i < 2:
            grid[f"b/{i}"] = (ref, to_uint8(x[:6]), None)
    res["b_caption_vs_reference"] = {k: rate(v) for k, v in follow.items()}
    log(f"(b) {json.dumps({k: round(v['p'], 3) for k, v in res['b_caption_vs_reference'].items()})}")

    # (c) partly occluded references: three (each occluded differently) against one, and one clean
    occl = {"1 clean": [], "1 occluded": [], "3 occluded": []}
    for i, ident in enumerate(cands):
        rng = np.random.default_rng(50_000 + i)
        clean = D.render([ident], D.random_scene_from(rng, held_out=True), rng)[0]
        occluded = [D.render([ident], D.random_scene_from(rng, held_out=True), rng, occlude=True)[0] for _ in range(3)]
        caps = [D.caption(D.random_scene_from(rng, held_out=True)) for _ in range(n)]
        for label, refs in (("1 clean", [clean]), ("1 occluded", occluded[:1]), ("3 occluded", occluded)):
            x = gen.sample(gen.apply(gen.identity(refs)), caps, seed=60_000 + i)
            occl[label] += (classify(x, cands)[1].argmax(1) == i).tolist()
            if i < 2 and label != "1 clean":
                grid[f"c/{i}/{label}"] = (np.concatenate(refs, 1), to_uint8(x[:6]), None)
    res["c_occluded_references"] = {k: rate(v) for k, v in occl.items()}
    a, b = res["c_occluded_references"]["3 occluded"], res["c_occluded_references"]["1 occluded"]
    res["c_occluded_references"]["3 minus 1, in standard errors"] = (a["p"] - b["p"]) / math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    log(f"(c) {json.dumps({k: round(v['p'], 3) if isinstance(v, dict) else round(v, 2) for k, v in res['c_occluded_references'].items()})}")

    # (d) two identities in one picture, left and right regions, with the Eq. 7 mask and without it
    W = 2 * D.SIZE
    left = torch.zeros(1, D.PICTURE, 2 * D.PICTURE)
    left[..., : D.PICTURE] = 1
    masks = torch.cat([left, 1 - left])
    two = {m: {"own": [], "partner": [], "both prefer own": []} for m in ("Eq. 7 masks", "no mask (merged)")}
    pairs = [(i, (i + 1 + i // 4) % len(cands)) for i in range(len(cands))]
    for p, (a_, b_) in enumerate(pairs):
        rng = np.random.default_rng(70_000 + p)
        ids = [gen.identity([D.render([cands[k]], D.random_scene_from(rng, held_out=True), rng)[0]]) for k in (a_, b_)]
        scenes = [{**D.random_scene(rng), "pose": "facing front"} for _ in range(n)]
        caps = [D.caption(sc, two=True) for sc in scenes]
        models = {"Eq. 7 masks": gen.apply_regions(ids, masks), "no mask (merged)": gen.apply(gen.merge(*ids))}
        for label, model in models.items():
            x = gen.sample(model, caps, seed=80_000 + p, width=W)
            halves = {"L": x[..., : D.SIZE], "R": x[..., D.SIZE:]}
            prefer = {}
            for side, own, other in (("L", a_, b_), ("R", b_, a_)):
                sc = classify(halves[side], cands)[1]
                prefer[side] = sc[:, own] > sc[:, other]
                two[label]["own"] += (sc.argmax(1) == own).tolist()
                two[label]["partner"] += (sc.argmax(1) == other).tolist()
            two[label]["both prefer own"] += (prefer["L"] & prefer["R"]).tolist()
            if p < 3:
                grid[f"d/{p}/{label}"] = (None, to_uint8(x[:4]), None)
    res["d_two_identities"] = {m: {k: rate(v) for k, v in d.items()} for m, d in two.items()}
    log(f"(d) {json.dumps({m: {k: round(v['p'], 3) for k, v in d.items()} for m, d in res['d_two_identities'].items()})}")
    return res, grid


def save_grid(grid, path, scale=3):
    """One row per entry: reference(s) | generations with the adapter | (for (a)) the same seeds without it."""
    from PIL import Image, ImageDraw
    rows = []
    for name, (ref, gen_, plain) in grid.items():
        gap = np.full((gen_.shape[1], 6, 3), 255, np.uint8)
        parts = [ref if ref is not None else np.full((gen_.shape[1], 32, 3), 255, np.uint8), gap, np.concatenate(list(gen_), 1)]
        if plain is not None:
            parts += [gap, np.concatenate(list(plain), 1)]
        rows.append((name, np.concatenate(parts, 1)))
    width = max(r.shape[1] for _, r in rows)
    label_w = 150
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


def ship_references(unseen, folder):
    """The 8 unseen identities' reference pictures (example inputs for the demo and the workflows)."""
    import domain as D
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    listing = []
    for i, ident in enumerate(unseen):
        rng = np.random.default_rng(90_000 + i)
        scene = {"expression": "smiling", "pose": "facing front", "background": "grey"}
        im = D.upscale(D.render([ident], scene, rng)[0])
        name = f"unseen_{i}.png"
        tmp = os.path.join(folder, f".{name}.tmp.png")
        Image.fromarray(im).save(tmp)
        os.replace(tmp, os.path.join(folder, name))
        listing.append({"file": name, "identity": ident, "scene": scene})
    write_text_atomic(os.path.join(folder, "identities.json"), json.dumps(
        {"about": "Reference faces of the 8 identities the shipped adapter never saw in training "
                  "(benchmarks/synthetic/run.py, make synthetic).", "references": listing}, indent=1))


def pct(r):
    return f"{100 * r['p']:.1f}% ± {100 * r['se']:.1f}"


def write_report(out: dict, path: str, command: str):
    """The figures of one run as markdown tables (generated, so the numbers are the run's own)."""
    r = out["results"]
    q = out["base_quality"]
    L = [f"# Synthetic identity domain: {out['scale']} run", "",
         f"Generated by `{command}` on {out['date']} ({out['device']}, torch {out['torch']}, ComfyUI {out['comfyui']}); "
         f"stage times in seconds: {out['seconds']}. Figures are measured on the shipped fp16 files. "
         "± is one standard error.", "",
         f"Chance for identity accuracy: {100 * out['chance']:.1f}% (the most likely of {N_EVAL} candidate identities).", "",
         "Attribute classifier, held-out drawn faces: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in out["classifier_heldout_accuracy"].items()), "",
         f"Adapter training: {out['adapter_training']['steps']} steps, batch {out['adapter_training']['batch']}, "
         f"{out['adapter_training']['pictures']} pictures of {out['adapter_training']['identities']} identities; mean loss of the first 20 steps "
         f"{out['adapter_training']['loss_first20']:.4f}, of the last 20 {out['adapter_training']['loss_last20']:.4f}.", "",
         "## Base model quality (no adapter)", "",
         f"Grain (Laplacian energy of samples / of drawn faces, 1 = as clean as a drawing): {q['grain_ratio']:.2f} (n = {q['n']}).",
         "Scene attributes read in base samples that match the caption: " +
         ", ".join(f"{k.split('_')[0]} {pct(v)}" for k, v in q.items() if isinstance(v, dict)) + ".", "",
         "## (a) Identity accuracy, with and without the adapter", "",
         "| identities | n | with adapter | without adapter | per attribute, with adapter |", "|---|---|---|---|---|"]
    for name in ("unseen", "seen"):
        a = r[f"a_{name}"]
        attrs = ", ".join(f"{k} {pct(v)}" for k, v in a["attributes_with_adapter"].items())
        L.append(f"| {name} in adapter training | {a['with adapter']['n']} | {pct(a['with adapter'])} | {pct(a['without adapter'])} | {attrs} |")
    b = r["b_caption_vs_reference"]
    L += ["", "## (b) Caption against reference (reference smiling, facing front, one background; the caption asks for another of each)", "",
          "| | follows the caption | copies the reference |", "|---|---|---|"]
    L += [f"| {k} | {pct(b[k + ' caption'])} | {pct(b[k + ' reference'])} |" for k in ("expression", "pose", "background")]
    L += ["", f"Any of the three copied from the reference: {pct(b['any copied'])}. Identity accuracy in these generations: {pct(b['identity'])}.", "",
          "## (c) Partly occluded references", "", "| references | identity accuracy |", "|---|---|"]
    c = r["c_occluded_references"]
    L += [f"| {k} | {pct(v)} |" for k, v in c.items() if isinstance(v, dict)]
    L += ["", f"Three half-occluded references against one: {c['3 minus 1, in standard errors']:+.1f} standard errors.", "",
          "## (d) Two identities in one picture (left and right regions)", "",
          "| | half shows its own identity | half shows the partner | both halves prefer their own over the partner |",
          "|---|---|---|---|"]
    L += [f"| {m} | {pct(d['own'])} | {pct(d['partner'])} | {pct(d['both prefer own'])} |" for m, d in r["d_two_identities"].items()]
    L += ["", f"Image grid: `grid_{out['scale']}.png` (reference | with adapter | same seeds without adapter).", ""]
    write_text_atomic(path, "\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic"), help="cache for data and trained models")
    ap.add_argument("--models", default=None, help="where the shipped files go (default: the pack's models/ for "
                    "--scale cpu, <work>/models otherwise)")
    ap.add_argument("--report", default=None, help="where results, report and grid go (default docs/synthetic for cpu)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from train import load_pack   # scripts/train.py: loads ComfyUI and this pack as idfusion_pack
    load_pack(args.comfyui, cpu=device.type == "cpu")
    import comfyui_version
    import domain as D
    from idfusion_pack.idfusion import synthetic
    s = SCALES[args.scale]
    official = args.scale == "cpu"
    models = args.models or (os.path.join(ROOT, "models") if official else os.path.join(args.work, "models"))
    report = args.report or (os.path.join(ROOT, "docs", "synthetic") if official else os.path.join(args.work, "report"))
    for d in (args.work, report, os.path.join(models, "idfusion"), os.path.join(models, "classifier")):
        os.makedirs(d, exist_ok=True)
    base_path = os.path.join(models, "synthetic_faces.safetensors")
    adapter_path = os.path.join(models, "idfusion", "synthetic_faces_adapter.safetensors")
    clf_path = os.path.join(models, "classifier", "synthetic_faces_classifier.safetensors")
    t0 = time.time()
    timings = {}
    unet_state, text_state, settings = train_base(s, args.work, device)
    ship_base(base_path, unet_state, text_state, settings)
    patcher, clip, codec, _ = synthetic.load(base_path)     # from here on: the shipped fp16 weights
    timings["base"] = time.time() - t0
    clf, clf_acc = train_classifier(s, args.work, device, clf_path)
    timings["classifier"] = time.time() - t0 - sum(timings.values())
    train_ids, unseen = split_identities(s)
    seen = train_ids[:N_EVAL]
    src, train_info = train_adapter(s, args.work, patcher, clip, codec, train_ids, key(settings))
    adapter = ship_adapter(src, adapter_path, train_info)
    timings["adapter"] = time.time() - t0 - sum(timings.values())
    gen = Generator(patcher, clip, codec, adapter, s["eval_steps"])
    quality, base_samples = base_quality(gen, clf, n=128 if official else 8)
    log(f"base quality: grain {quality['grain_ratio']:.2f}, " + ", ".join(f"{k} {v['p']:.3f}" for k, v in quality.items() if isinstance(v, dict)))
    res, grid = evaluate(s, gen, clf, seen, unseen)
    grid = {"base samples (no adapter)": (None, base_samples, None), **grid}
    timings["evaluation"] = time.time() - t0 - sum(timings.values())
    save_grid(grid, os.path.join(report, f"grid_{args.scale}.png"))
    out = {"scale": args.scale, "settings": s, "device": str(device), "torch": torch.__version__,
           "comfyui": comfyui_version.__version__, "date": time.strftime("%Y-%m-%d"), "chance": 1 / N_EVAL,
           "classifier_heldout_accuracy": clf_acc, "adapter_training": train_info, "base_quality": quality,
           "results": res, "seconds": {k: round(v) for k, v in timings.items()}}
    path = os.path.join(report, f"results_{args.scale}.json")
    write_text_atomic(path, json.dumps(out, indent=1))
    write_report(out, os.path.join(report, f"report_{args.scale}.md"),
                 "make synthetic" if official else f"benchmarks/synthetic/run.py --scale {args.scale}")
    # the measured figures travel with the shipped files
    figures = {"date": out["date"], "chance": 1 / N_EVAL, "base_grain_ratio": round(quality["grain_ratio"], 3),
               "unseen_identity_accuracy": {k: round(res["a_unseen"][k]["p"], 4) for k in ("with adapter", "without adapter")},
               "n": res["a_unseen"]["with adapter"]["n"], "report": "docs/synthetic_identity.md"}
    ship_base(base_path, unet_state, text_state, settings, figures)
    ship_adapter(src, adapter_path, train_info, figures)
    ship_references(unseen, os.path.join(ROOT, "workflows", "assets", "synthetic") if official else os.path.join(models, "references"))
    log(f"done in {time.time() - t0:.0f}s: {path}")


if __name__ == "__main__":
    main()
