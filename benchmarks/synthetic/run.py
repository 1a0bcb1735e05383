"""Proof that the adapter learns identity, on a synthetic domain this project generates itself (issue 3).

    make synthetic            # or: .hosts/0.3.75/venv/bin/python benchmarks/synthetic/run.py [--scale cpu|gpu]

Stages (each cached in --work, keyed by its settings, so a re-run reuses what did not change):
1. draw procedural faces (benchmarks/synthetic/domain.py);
2. train a tiny pixel-space base diffusion model, built from ComfyUI's UNet classes, and its word-level text
   encoder, on captions that describe expression, pose and background but never the identity;
3. train an attribute classifier on the drawn faces (the measuring instrument);
4. train the adapter with this pack's Trainer (idfusion/train.py) on the training identities, the reference
   being another picture of the same identity;
5. generate through this pack's nodes (Encode Reference, Apply, Apply Multi-Identity, Merge References) and
   ComfyUI's sampler, and measure (a)-(d). Report, figures and image grid go to --report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "scripts")]

SCALES = {  # cpu: about 15 minutes on a 2-core VM; gpu: the larger run
    "cpu": dict(base_steps=1200, base_batch=32, channels=64, clf_steps=400, train_ids=24, per_id=24,
                adapter_steps=800, adapter_batch=16, samples=8, eval_steps=20),
    "smoke": dict(base_steps=20, base_batch=8, channels=32, clf_steps=20, train_ids=8, per_id=4,
                  adapter_steps=4, adapter_batch=4, samples=2, eval_steps=3),   # wiring check only
    "gpu": dict(base_steps=12000, base_batch=128, channels=96, clf_steps=2000, train_ids=24, per_id=48,
                adapter_steps=3000, adapter_batch=32, samples=32, eval_steps=30),
}
N_EVAL = 8       # identities per evaluation set (chance = 1/8)
CFG = 3.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_text_atomic(path: str, text: str):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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


def train_base(s, work, device):
    import domain as D
    from idfusion_pack.idfusion.adapter import read_safetensors, save_safetensors_atomic
    from idfusion_pack.idfusion.train import _loss_weight
    unet = D.unet_config(s["channels"])
    settings = {**{k: s[k] for k in ("base_steps", "base_batch")}, "unet": {k: str(v) for k, v in unet.items()}, "pred": "v"}
    path = os.path.join(work, f"base-{key(settings)}.safetensors")
    patcher = D.build_base(unet)
    text = D.WordEncoder()
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, "idfusion.synthetic_base", "synthetic base model")
        patcher.model.diffusion_model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
        log(f"base model: reused {path}")
        return patcher, text.eval().requires_grad_(False), key(settings)
    model = patcher.model.to(device)
    text.to(device)
    codec = D.PixelCodec()
    singles, s_caps, doubles, d_caps = render_pool(6000, 2000, seed=1)
    singles, doubles = (codec.encode((x.movedim(1, -1) + 1) / 2) for x in (singles, doubles))   # pixels -> latents
    ms = model.model_sampling
    params = list(model.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.diffusion_model.parameters()]
    g = torch.Generator().manual_seed(0)
    t0, B = time.time(), s["base_batch"]
    model.train()
    for step in range(s["base_steps"]):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * D.cosine_lr(step, s["base_steps"], 100)
        two = step % 4 == 3                       # one batch in four: two people side by side
        pool, caps = (doubles, d_caps) if two else (singles, s_caps)
        idx = torch.randint(len(pool), (B // 2 if two else B,), generator=g)
        x0 = pool[idx].to(device)
        texts = [caps[i] if torch.rand(1, generator=g) > 0.1 else "" for i in idx.tolist()]   # 10% unconditional
        ctx = text(torch.cat([text.tokenize(t) for t in texts]).to(device))
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g).float()
        sigma = ms.sigma(t).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        denoised = model.apply_model(ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0), sigma, c_crossattn=ctx)
        loss = (((denoised - x0) ** 2) * _loss_weight(ms, sigma).view(-1, 1, 1, 1)).mean()   # the v-prediction MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, model.diffusion_model.parameters()):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 50 == 0 or step == s["base_steps"] - 1:
            log(f"base step {step + 1}/{s['base_steps']} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for e, p in zip(ema, model.diffusion_model.parameters()):
            p.copy_(e)
    model.eval().cpu()
    text.eval().cpu().requires_grad_(False)
    model.diffusion_model.requires_grad_(False)
    tensors = {f"unet.{k}": v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
    tensors.update({f"text.{k}": v.contiguous() for k, v in text.state_dict().items()})
    save_safetensors_atomic(tensors, path, {"format": "idfusion.synthetic_base", "settings": json.dumps(settings),
                                            "seconds": f"{time.time() - t0:.0f}"})
    log(f"base model: trained in {time.time() - t0:.0f}s -> {path}")
    return patcher, text, key(settings)


# ---- stage 3: classifier -----------------------------------------------------------------------
def train_classifier(s, work, device):
    import domain as D
    from idfusion_pack.idfusion.adapter import read_safetensors, save_safetensors_atomic
    settings = {"clf_steps": s["clf_steps"], "v": 1}
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
        g = torch.Generator().manual_seed(0)
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
    lp = clf.log_probs(test_x)
    acc = {k: float((lp[k].argmax(1) == test_y[k]).float().mean()) for k in lp}
    log("classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return clf, acc


# ---- stage 4: adapter --------------------------------------------------------------------------
def write_dataset(folder, idents, per_id, seed):
    import domain as D
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i, ident in enumerate(idents):
        d = os.path.join(folder, f"id{i:02d}")
        os.makedirs(d, exist_ok=True)
        for j in range(per_id):
            scene = D.random_scene(rng)
            im, mask = D.render([ident], scene, rng)
            Image.fromarray(im).save(os.path.join(d, f"{j:03d}.png"))
            Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(d, f"{j:03d}_mask.png"))
            with open(os.path.join(d, f"{j:03d}.txt"), "w") as f:
                f.write(D.caption(scene))


def train_adapter(s, work, patcher, text, train_idents, base_key):
    import domain as D
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    from idfusion_pack.idfusion.dataset import FaceDataset
    from idfusion_pack.idfusion.train import TrainConfig, Trainer
    cfg = TrainConfig(steps=s["adapter_steps"], batch_size=s["adapter_batch"], lr=1e-3, warmup_steps=20,
                      save_every=max(50, s["adapter_steps"] // 4), seed=0, init="attn1", reference="other image",
                      reference_dropout=0.1, face_loss_weight=1.0, encoding="cached", timestep=0,
                      gradient_checkpointing=False)  # 32 px: memory is no concern, recompute would cost time
    settings = {"cfg": cfg.__dict__, "ids": len(train_idents), "per_id": s["per_id"], "base": base_key}
    out = os.path.join(work, f"adapter-{key(settings)}")
    data = os.path.join(out, "data")
    if not os.path.isdir(data):
        write_dataset(data + ".tmp", train_idents, s["per_id"], seed=5)
        os.replace(data + ".tmp", data)
    ds = FaceDataset(data, D.SIZE)
    trainer = Trainer(patcher, text, D.PixelCodec(), ds, out, "synthetic", cfg)
    trainer.resume()
    t0 = time.time()
    if trainer.step < cfg.steps:
        log(f"adapter: {len(ds)} pictures of {len(train_idents)} identities, steps {trainer.step}..{cfg.steps}")
        trainer.run(on_step=lambda step, loss: step % 50 == 0 and log(f"adapter step {step} loss {loss:.4f}"))
    log(f"adapter: trained in {time.time() - t0:.0f}s ({trainer.adapter_path})")
    first = float(np.mean([l for _, l in trainer.losses[:20]]))
    last = float(np.mean([l for _, l in trainer.losses[-20:]]))
    return IDFusionAdapter.load(trainer.adapter_path), {"loss_first20": first, "loss_last20": last,
                                                        "steps": cfg.steps, "batch": cfg.batch_size,
                                                        "pictures": len(ds), "loss_curve": os.path.join(out, "synthetic.loss.png")}


# ---- stage 5: generation through the nodes ------------------------------------------------------
class Generator:
    def __init__(self, patcher, text, adapter, steps):
        import domain as D
        import idfusion_pack
        self.D, self.patcher, self.text, self.adapter, self.steps = D, patcher, text, adapter, steps
        self.nodes = {k: v() for k, v in idfusion_pack.NODE_CLASS_MAPPINGS.items()}
        self.codec = D.PixelCodec()

    def identity(self, pictures: list[np.ndarray], name="ref"):
        images = torch.from_numpy(np.stack(pictures)).float() / 255.0
        return self.nodes["IDFusionEncodeReference"].encode(self.patcher, self.codec, images, 0, name)[0]

    def apply(self, identity, weight=1.0):
        return self.nodes["IDFusionApply"].apply(self.patcher, self.adapter, identity, weight, 0.0, 1.0, "text only", "cached")[0]

    def apply_regions(self, idents, masks):
        kw = {f"identity_{i + 1}": x for i, x in enumerate(idents)}
        return self.nodes["IDFusionApplyMultiIdentity"].apply(self.patcher, self.adapter, masks, 1.0, 0.0, 1.0,
                                                              "text only", "cached", **kw)[0]

    def merge(self, a, b):
        return self.nodes["IDFusionMergeIdentities"].merge(a, b)[0]

    def sample(self, model, captions, seed, width=None):
        import comfy.sample
        D = self.D
        width = width or D.SIZE
        latent = torch.zeros(len(captions), 3 * D.FACTOR ** 2, D.SIZE // D.FACTOR, width // D.FACTOR)
        noise = comfy.sample.prepare_noise(latent, seed)
        pos = [[self.text.encode(captions), {}]]
        neg = [[self.text.encode([""]), {}]]
        x = comfy.sample.sample(model, noise, self.steps, CFG, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)
        return self.codec.decode(x).movedim(-1, 1) * 2 - 1    # pixels in [-1, 1], (B, 3, H, W)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def evaluate(s, gen, clf, eval_sets):
    """(a)-(d). Every generation is classified; an identity is 'recognised' when it is the most likely of the
    evaluation set's N_EVAL candidates under the classifier's attribute probabilities (chance 1/N_EVAL)."""
    D = gen.D
    n = s["samples"]
    res, grid = {}, {}

    def classify(x, candidates):
        lp = clf.log_probs(x)
        return lp, D.identity_scores(lp, candidates)

    # (a) identity accuracy with and without the adapter, on identities seen and unseen in adapter training
    for set_name, cands in eval_sets.items():
        hits = {"adapter": [], "no adapter": []}
        attr_hits = {k: [] for k in D.IDENTITY_ATTRS}
        for i, ident in enumerate(cands):
            rng = np.random.default_rng(1000 + i)
            ref = D.render([ident], D.random_scene(rng), rng)[0]
            caps = [D.caption(D.random_scene(rng)) for _ in range(n)]
            with_id = gen.sample(gen.apply(gen.identity([ref])), caps, seed=i)
            plain = gen.sample(gen.patcher, caps, seed=i)
            for label, x in (("adapter", with_id), ("no adapter", plain)):
                lp, sc = classify(x, cands)
                hits[label] += (sc.argmax(1) == i).tolist()
                if label == "adapter":
                    for k in D.IDENTITY_ATTRS:
                        attr_hits[k] += (lp[k].argmax(1) == D.ALL_ATTRS[k].index(ident[k])).tolist()
            if i < 4:
                grid[f"a/{set_name}/{i}"] = (ref, to_uint8(with_id[:6]), to_uint8(plain[:6]))
        res[f"a_{set_name}"] = {k: float(np.mean(v)) for k, v in hits.items()}
        res[f"a_{set_name}"]["attributes_with_adapter"] = {k: float(np.mean(v)) for k, v in attr_hits.items()}
        res[f"a_{set_name}"]["n"] = len(hits["adapter"])
        log(f"(a) {set_name}: identity accuracy {res[f'a_{set_name}']}")

    cands = eval_sets["unseen"]
    # (b) caption against reference: the reference smiles on one background; the caption asks for another
    # expression (crying, like the paper's "Cry") and another background
    follow = {"expression text": [], "expression reference": [], "background text": [], "background reference": [], "identity": []}
    for i, ident in enumerate(cands):
        rng = np.random.default_rng(2000 + i)
        ref_scene = {"expression": "smiling", "pose": "facing front", "background": D.SCENE_ATTRS["background"][i % 4]}
        ref = D.render([ident], ref_scene, rng)[0]
        scenes = []
        for j in range(n):
            sc = D.random_scene(rng)
            sc["expression"] = ["crying", "surprised", "neutral"][j % 3]
            sc["background"] = [b for b in D.BACKGROUNDS if b != ref_scene["background"]][j % 3]
            scenes.append(sc)
        x = gen.sample(gen.apply(gen.identity([ref])), [D.caption(sc) for sc in scenes], seed=100 + i)
        lp, sc_id = classify(x, cands)
        for k in ("expression", "background"):
            pred = [D.ALL_ATTRS[k][j] for j in lp[k].argmax(1).tolist()]
            follow[f"{k} text"] += [p == sc[k] for p, sc in zip(pred, scenes)]
            follow[f"{k} reference"] += [p == ref_scene[k] for p in pred]
        follow["identity"] += (sc_id.argmax(1) == i).tolist()
        if i < 2:
            grid[f"b/{i}"] = (ref, to_uint8(x[:6]), None)
    res["b_caption_vs_reference"] = {k: float(np.mean(v)) for k, v in follow.items()}
    log(f"(b) {res['b_caption_vs_reference']}")

    # (c) partly occluded references: one against three (each occluded differently), and one clean
    occl = {"1 clean": [], "1 occluded": [], "3 occluded": []}
    for i, ident in enumerate(cands):
        rng = np.random.default_rng(3000 + i)
        clean = D.render([ident], D.random_scene(rng), rng)[0]
        occluded = [D.render([ident], D.random_scene(rng), rng, occlude=True)[0] for _ in range(3)]
        caps = [D.caption(D.random_scene(rng)) for _ in range(n)]
        for label, refs in (("1 clean", [clean]), ("1 occluded", occluded[:1]), ("3 occluded", occluded)):
            x = gen.sample(gen.apply(gen.identity(refs)), caps, seed=200 + i)
            occl[label] += (classify(x, cands)[1].argmax(1) == i).tolist()
            if i < 2 and label != "1 clean":
                grid[f"c/{i}/{label}"] = (np.concatenate(refs, 1), to_uint8(x[:6]), None)
    res["c_occluded_references"] = {k: float(np.mean(v)) for k, v in occl.items()}
    log(f"(c) {res['c_occluded_references']}")

    # (d) two identities in one picture, left and right regions, with the Eq. 7 mask and without it
    W = 2 * D.SIZE
    left = torch.zeros(1, D.SIZE, W)
    left[..., : D.SIZE] = 1
    masks = torch.cat([left, 1 - left])
    two = {m: {"own": [], "other": [], "both": []} for m in ("Eq. 7 masks", "no mask (merged)")}
    pairs = [(i, (i + 1 + i // 4) % len(cands)) for i in range(len(cands))]
    for p, (a, b) in enumerate(pairs):
        rng = np.random.default_rng(4000 + p)
        ids = [gen.identity([D.render([cands[k]], D.random_scene(rng), rng)[0]]) for k in (a, b)]
        scenes = [{**D.random_scene(rng), "pose": "facing front"} for _ in range(n)]
        caps = [D.caption(sc, two=True) for sc in scenes]
        models = {"Eq. 7 masks": gen.apply_regions(ids, masks), "no mask (merged)": gen.apply(gen.merge(*ids))}
        for label, model in models.items():
            x = gen.sample(model, caps, seed=300 + p, width=W)
            halves = {"L": x[..., : D.SIZE], "R": x[..., D.SIZE:]}
            own_other = {}
            for side, own, other in (("L", a, b), ("R", b, a)):
                sc = classify(halves[side], cands)[1]
                own_other[side] = (sc[:, own] > sc[:, other])          # own identity preferred over the partner's
                two[label]["own"] += (sc.argmax(1) == own).tolist()
                two[label]["other"] += (sc.argmax(1) == other).tolist()
            two[label]["both"] += (own_other["L"] & own_other["R"]).tolist()
            if p < 3:
                grid[f"d/{p}/{label}"] = (None, to_uint8(x[:4]), None)
    res["d_two_identities"] = {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in two.items()}
    log(f"(d) {res['d_two_identities']}")
    return res, grid


def save_grid(grid, path):
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
    scale, label_w = 3, 150
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


def write_report(out: dict, path: str, command: str):
    """The figures of one run as markdown tables (generated, so the numbers are the run's own)."""
    r, pct = out["results"], (lambda v: f"{100 * v:.1f}%")
    L = [f"# Synthetic identity domain: {out['scale']} run", "",
         f"Generated by `{command}` on {out['date']} ({out['device']}, torch {out['torch']}); "
         f"stage times in seconds: {out['seconds']}. Settings: `{json.dumps(out['settings'])}`.", "",
         f"Chance for identity accuracy: {pct(out['chance'])} (the most likely of {N_EVAL} candidate identities).", "",
         "Attribute classifier, held-out drawn faces: " + ", ".join(f"{k} {pct(v)}" for k, v in out["classifier_heldout_accuracy"].items()), "",
         f"Adapter training: {out['adapter_training']['steps']} steps, batch {out['adapter_training']['batch']}, "
         f"{out['adapter_training']['pictures']} pictures; mean loss of the first 20 steps "
         f"{out['adapter_training']['loss_first20']:.4f}, of the last 20 {out['adapter_training']['loss_last20']:.4f}.", "",
         "## (a) Identity accuracy, with and without the adapter", "",
         "| identities | n | with adapter | without adapter | per attribute, with adapter |", "|---|---|---|---|---|"]
    for name in ("seen", "unseen"):
        a = r[f"a_{name}"]
        attrs = ", ".join(f"{k} {pct(v)}" for k, v in a["attributes_with_adapter"].items())
        L.append(f"| {name} in adapter training | {a['n']} | {pct(a['adapter'])} | {pct(a['no adapter'])} | {attrs} |")
    b = r["b_caption_vs_reference"]
    L += ["", "## (b) Caption against reference (reference smiling; caption asks for another expression and background)", "",
          "| | follows the caption | follows the reference |", "|---|---|---|",
          f"| expression | {pct(b['expression text'])} | {pct(b['expression reference'])} |",
          f"| background | {pct(b['background text'])} | {pct(b['background reference'])} |", "",
          f"Identity accuracy in these generations: {pct(b['identity'])}.", "",
          "## (c) Partly occluded references", "", "| references | identity accuracy |", "|---|---|"]
    L += [f"| {k} | {pct(v)} |" for k, v in r["c_occluded_references"].items()]
    L += ["", "## (d) Two identities in one picture (left and right regions)", "",
          "| | half shows its own identity | half shows the partner | both halves prefer their own over the partner |",
          "|---|---|---|---|"]
    L += [f"| {m} | {pct(d['own'])} | {pct(d['other'])} | {pct(d['both'])} |" for m, d in r["d_two_identities"].items()]
    L += ["", f"Image grid: `grid_{out['scale']}.png` (reference | with adapter | same seeds without adapter).", ""]
    write_text_atomic(path, "\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--work", default=os.path.join(ROOT, ".synthetic"), help="cache for data and trained models")
    ap.add_argument("--report", default=os.path.join(ROOT, "docs", "synthetic"), help="where results.json and grid.png go")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from train import load_pack   # scripts/train.py: loads ComfyUI and this pack as idfusion_pack
    load_pack(args.comfyui, cpu=device.type == "cpu")
    import domain as D
    torch.manual_seed(0)
    s = SCALES[args.scale]
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.report, exist_ok=True)
    t0 = time.time()
    timings = {}
    patcher, text, base_key = train_base(s, args.work, device)
    timings["base"] = time.time() - t0
    clf, clf_acc = train_classifier(s, args.work, device)
    timings["classifier"] = time.time() - t0 - sum(timings.values())
    everyone = D.identities(s["train_ids"] + N_EVAL, seed=0)
    train_ids, unseen = everyone[: s["train_ids"]], everyone[s["train_ids"]:]
    adapter, train_info = train_adapter(s, args.work, patcher, text, train_ids, base_key)
    timings["adapter"] = time.time() - t0 - sum(timings.values())
    gen = Generator(patcher, text, adapter, s["eval_steps"])
    res, grid = evaluate(s, gen, clf, {"seen": train_ids[:N_EVAL], "unseen": unseen})
    timings["evaluation"] = time.time() - t0 - sum(timings.values())
    save_grid(grid, os.path.join(args.report, f"grid_{args.scale}.png"))
    out = {"scale": args.scale, "settings": s, "device": str(device), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "chance": 1 / N_EVAL, "classifier_heldout_accuracy": clf_acc,
           "adapter_training": train_info, "results": res, "seconds": {k: round(v) for k, v in timings.items()}}
    path = os.path.join(args.report, f"results_{args.scale}.json")
    write_text_atomic(path, json.dumps(out, indent=1))
    write_report(out, os.path.join(args.report, f"report_{args.scale}.md"),
                 "make synthetic" if args.scale == "cpu" else f"benchmarks/synthetic/run.py --scale {args.scale}")
    log(f"done in {time.time() - t0:.0f}s: {path}")


if __name__ == "__main__":
    main()
