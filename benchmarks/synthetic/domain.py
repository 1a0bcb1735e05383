"""A synthetic identity domain small enough to train on a CPU: procedurally drawn faces, a tiny pixel-space
diffusion model built from ComfyUI's own UNet classes, its word-level text encoder, and an attribute
classifier that measures what the generations show.

An identity is a fixed set of attributes (skin, hair and eye colour, face shape, eye spacing). Expression,
pose and background vary from picture to picture, and the caption describes only those. So a base model
trained on captions alone cannot know whose face to draw: only the adapter's reference can tell it.
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

SIZE = 32          # pixels per face; a two-person picture is 2*SIZE wide
SUPER = 4          # drawn at 4x and downsampled, so features are anti-aliased

IDENTITY_ATTRS = {
    "skin": {"pale": (240, 208, 182), "tan": (196, 146, 100), "brown": (112, 72, 44)},
    "hair": {"black": (24, 24, 28), "blond": (236, 204, 84), "red": (196, 58, 28), "white": (232, 232, 236)},
    "eyes": {"blue": (40, 96, 236), "green": (30, 176, 60), "dark": (40, 20, 12)},
    "shape": {"round": (0.34, 0.34), "long": (0.26, 0.40)},      # face semi-axes, fraction of the picture
    "spacing": {"close": 0.085, "wide": 0.165},                   # eye offset from the face centre line
}
EXPRESSIONS = ["smiling", "neutral", "crying", "surprised"]
POSES = {"facing left": -0.06, "facing front": 0.0, "facing right": 0.06}   # features shift with the head turn
BACKGROUNDS = {"purple": (112, 56, 160), "teal": (36, 136, 136), "orange": (236, 136, 36), "grey": (128, 128, 128)}
SCENE_ATTRS = {"expression": EXPRESSIONS, "pose": list(POSES), "background": list(BACKGROUNDS)}
ALL_ATTRS = {**{k: list(v) for k, v in IDENTITY_ATTRS.items()}, **SCENE_ATTRS}


def identities(n: int, seed: int = 0, min_distance: int = 2) -> list[dict]:
    """n distinct identities, any two differing in at least `min_distance` attributes (greedy over a seeded
    shuffle of all combinations)."""
    names = list(IDENTITY_ATTRS)
    combos = list(itertools.product(*[list(IDENTITY_ATTRS[k]) for k in names]))
    order = np.random.default_rng(seed).permutation(len(combos))
    chosen = []
    for i in order:
        c = combos[i]
        if all(sum(a != b for a, b in zip(c, o)) >= min_distance for o in chosen):
            chosen.append(c)
        if len(chosen) == n:
            return [dict(zip(names, c)) for c in chosen]
    raise ValueError(f"only {len(chosen)} identities are {min_distance} attributes apart")


def every_identity() -> list[dict]:
    """All attribute combinations, in a fixed shuffled order: what a generic base model should be able to draw."""
    return identities(math.prod(len(v) for v in IDENTITY_ATTRS.values()), seed=99, min_distance=1)


def caption(scene: dict, two: bool = False) -> str:
    if two:
        return f"two people, {scene['expression']}, {scene['background']} background"
    return f"a photo of a person, {scene['expression']}, {scene['pose']}, {scene['background']} background"


def random_scene(rng) -> dict:
    return {k: v[rng.integers(len(v))] for k, v in SCENE_ATTRS.items()}


def draw_face(d: ImageDraw.ImageDraw, ident: dict, scene: dict, x0: float, S: float, jitter=(0.0, 0.0)):
    """One face in the S x S square whose left edge is x0 (in drawing pixels)."""
    ax, ay = (a * S for a in IDENTITY_ATTRS["shape"][ident["shape"]])
    cx, cy = x0 + S / 2 + jitter[0] * S, S * 0.54 + jitter[1] * S
    turn = POSES[scene["pose"]] * S
    hair = IDENTITY_ATTRS["hair"][ident["hair"]]
    d.ellipse([cx - ax - 0.05 * S, cy - ay - 0.09 * S, cx + ax + 0.05 * S, cy + ay * 0.35], fill=hair)
    d.ellipse([cx - ax, cy - ay, cx + ax, cy + ay], fill=IDENTITY_ATTRS["skin"][ident["skin"]])
    d.chord([cx - ax, cy - ay - 0.02 * S, cx + ax, cy - ay * 0.25], 180, 360, fill=hair)   # fringe
    # eyes ~4 px across at 32 px, so eye colour and spacing survive the model's resolution
    ex, ey, r = IDENTITY_ATTRS["spacing"][ident["spacing"]] * S, cy - 0.04 * S, 0.062 * S
    eye = IDENTITY_ATTRS["eyes"][ident["eyes"]]
    for sx in (-1, 1):
        x = cx + turn + sx * ex
        d.ellipse([x - r * 1.3, ey - r, x + r * 1.3, ey + r], fill=(250, 250, 250))
        d.ellipse([x - r, ey - r, x + r, ey + r], fill=eye)
        if scene["expression"] == "crying":
            d.rectangle([x - r * 0.6, ey + r, x + r * 0.6, ey + r + 0.16 * S], fill=(120, 190, 255))
    mx, my, mw = cx + turn, cy + 0.17 * S, 0.13 * S
    lip = (150, 30, 40)
    w = max(1, int(S * 0.03))
    e = scene["expression"]
    if e == "smiling":
        d.arc([mx - mw, my - mw, mx + mw, my + mw * 0.6], 20, 160, fill=lip, width=w)
    elif e == "crying":
        d.arc([mx - mw, my, mx + mw, my + mw * 1.4], 200, 340, fill=lip, width=w)
    elif e == "surprised":
        d.ellipse([mx - mw * 0.45, my - mw * 0.5, mx + mw * 0.45, my + mw * 0.6], fill=(60, 10, 20))
    else:
        d.line([mx - mw * 0.8, my + mw * 0.1, mx + mw * 0.8, my + mw * 0.1], fill=lip, width=w)


def render(idents: list[dict], scene: dict, rng=None, occlude: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Picture (H, W, 3) uint8 of one or two faces side by side, and its face mask (H, W) float in [0, 1].
    occlude: a random block covers about half of the (first) face, for the partial-reference experiment."""
    rng = rng if rng is not None else np.random.default_rng(0)
    S = SIZE * SUPER
    W = S * len(idents)
    im = Image.new("RGB", (W, S), BACKGROUNDS[scene["background"]])
    mask = Image.new("L", (W, S), 0)
    d, dm = ImageDraw.Draw(im), ImageDraw.Draw(mask)
    for i, ident in enumerate(idents):
        jitter = tuple(rng.uniform(-0.04, 0.04, 2))
        draw_face(d, ident, scene, i * S, S, jitter)
        ax, ay = (a * S for a in IDENTITY_ATTRS["shape"][ident["shape"]])
        cx, cy = i * S + S / 2 + jitter[0] * S, S * 0.54 + jitter[1] * S
        dm.ellipse([cx - ax - 0.05 * S, cy - ay - 0.09 * S, cx + ax + 0.05 * S, cy + ay], fill=255)
    if occlude:
        side = rng.integers(4)   # cover the left, right, top or bottom half of the face square
        x0, y0, x1, y1 = 0.15 * S, 0.1 * S, 0.85 * S, 0.95 * S
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        box = [[x0, y0, xm, y1], [xm, y0, x1, y1], [x0, y0, x1, ym], [x0, ym, x1, y1]][side]
        d.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    size = (W // SUPER, S // SUPER)
    return (np.asarray(im.resize(size, Image.BOX)),
            np.asarray(mask.resize(size, Image.BOX), dtype=np.float32) / 255.0)


# ---- the base model's pieces (the model itself lives in the pack: idfusion/synthetic.py) ------------------
FACTOR = 4         # the UNet works on 4x4 space-to-depth patches of the 32 px drawing: an 8x8x48 latent
POOL = 8 // FACTOR  # and ComfyUI sees pictures of 32*POOL px (its latents are width/8)
PICTURE = SIZE * POOL


def upscale(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) drawings at the model's 32 px -> the pictures a user sees (each pixel POOL x POOL)."""
    return images.repeat(POOL, -3).repeat(POOL, -2)


def to_latent(x: torch.Tensor) -> torch.Tensor:
    """Drawings (B, 3, H, W) in [-1, 1] at 32 px -> latents; equal to the codec's encode of upscale(x)."""
    return torch.nn.functional.pixel_unshuffle(x, FACTOR)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Latents -> drawings (B, 3, H, W) in [-1, 1] at 32 px (what the classifier reads)."""
    return torch.nn.functional.pixel_shuffle(latent.float(), FACTOR).clamp(-1, 1)


def all_scenes() -> list[dict]:
    return [dict(zip(SCENE_ATTRS, c)) for c in itertools.product(*SCENE_ATTRS.values())]


def vocabulary_captions():
    scenes = all_scenes()
    return [caption(s) for s in scenes] + [caption(s, two=True) for s in scenes] + ["a photo of a person"]


def vocabulary() -> list[str]:
    return sorted({w for text in vocabulary_captions() for w in re.findall(r"[a-z]+", text)})


def held_out_scene(scene: dict) -> bool:
    """12 of the 48 scenes (every expression, pose and background appears) never captioned in adapter training:
    the evaluation's captions come only from these."""
    e, p, b = (SCENE_ATTRS[k].index(scene[k]) for k in ("expression", "pose", "background"))
    return (e + p + b) % 4 == 0


def random_scene_from(rng, held_out: bool, **fixed) -> dict:
    """A random scene that is (or is not) held out, with some attributes fixed or excluded (values: a value, or
    ('not', value))."""
    def ok(sc):
        for k, v in fixed.items():
            if isinstance(v, tuple) and sc[k] == v[1] or not isinstance(v, tuple) and sc[k] != v:
                return False
        return held_out_scene(sc) == held_out
    choices = [sc for sc in all_scenes() if ok(sc)]
    if not choices:
        raise ValueError(f"no {'held-out' if held_out else 'training'} scene with {fixed}")
    return dict(choices[rng.integers(len(choices))])


# ---- the attribute classifier -------------------------------------------------------------------
class AttributeClassifier(nn.Module):
    """A small CNN with one head per attribute (identity attributes and scene attributes), on 32 px faces."""

    def __init__(self):
        super().__init__()
        c = 48
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(2 * c * 64, 256), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ALL_ATTRS.items()})

    def forward(self, x):   # x (B, 3, 32, 32) in [-1, 1]
        f = self.body(x)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def log_probs(self, x):
        self.eval()
        return {k: torch.log_softmax(v, -1) for k, v in self(x).items()}


def identity_scores(log_probs: dict, candidates: list[dict]) -> torch.Tensor:
    """(B, K): log-likelihood of each candidate identity = sum over identity attributes of log p(its value)."""
    cols = []
    for ident in candidates:
        cols.append(sum(log_probs[k][:, ALL_ATTRS[k].index(ident[k])] for k in IDENTITY_ATTRS))
    return torch.stack(cols, 1)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
