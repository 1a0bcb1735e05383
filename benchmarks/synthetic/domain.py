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
    "spacing": {"close": 0.09, "wide": 0.16},                     # eye offset from the face centre line
}
EXPRESSIONS = ["smiling", "neutral", "crying", "surprised"]
POSES = {"facing left": -0.07, "facing front": 0.0, "facing right": 0.07}   # features shift with the head turn
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
    ex, ey, r = IDENTITY_ATTRS["spacing"][ident["spacing"]] * S, cy - 0.04 * S, 0.045 * S
    eye = IDENTITY_ATTRS["eyes"][ident["eyes"]]
    for sx in (-1, 1):
        x = cx + turn + sx * ex
        d.ellipse([x - r * 1.4, ey - r, x + r * 1.4, ey + r], fill=(250, 250, 250))
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


# ---- the tiny base model ----------------------------------------------------------------------
FACTOR = 4         # the codec folds 4x4 pixel patches into channels: a 32 px face is an 8x8x48 latent


def unet_config(channels: int = 64, channel_mult=(1, 2), context_dim: int = 64) -> dict:
    """ComfyUI's UNetModel on the 8x8 latent: one level per channel_mult entry, a cross-attention layer after
    every ResBlock and in the middle."""
    levels = len(channel_mult)
    return {"use_checkpoint": False, "image_size": SIZE // FACTOR, "in_channels": 3 * FACTOR ** 2,
            "out_channels": 3 * FACTOR ** 2, "model_channels": channels, "num_res_blocks": [1] * levels,
            "channel_mult": list(channel_mult), "transformer_depth": [1] * levels,
            "transformer_depth_output": [1] * (2 * levels), "transformer_depth_middle": 1,
            "context_dim": context_dim, "num_head_channels": 32, "num_heads": -1,
            "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
            "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
            "dtype": torch.float32}


def model_config(unet: dict):
    import comfy.latent_formats
    import comfy.supported_models_base

    class PixelSpace(comfy.latent_formats.LatentFormat):
        """Pixels in [-1, 1], folded by PixelCodec: no learned VAE, the codec is exactly invertible."""
        latent_channels = unet["in_channels"]

        def __init__(self):
            self.scale_factor = 1.0

    class SyntheticFaces(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}      # BASE's default would override num_head_channels
        latent_format = PixelSpace
        memory_usage_factor = 1.0

        def inpaint_model(self):   # BASE reads "more than 4 input channels" as an inpainting UNet
            return False

        def model_type(self, state_dict, prefix=""):
            # v prediction: with eps, a small eps error at high sigma is a large x0 error (x0 = x - sigma*eps),
            # and a briefly trained model drifts off while sampling
            import comfy.model_base
            return comfy.model_base.ModelType.V_PREDICTION

    cfg = SyntheticFaces(dict(unet))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def build_base(unet: dict, seed: int = 0):
    """A ComfyUI BaseModel (v prediction, SD's discrete schedule) around a freshly initialised UNet."""
    import comfy.model_patcher
    from random_models import randomize_  # scripts/ is on sys.path (run.py)
    model = model_config(unet).get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed)
    with torch.no_grad():   # a zero output conv: the untrained model predicts no noise, a stable start
        for p in model.diffusion_model.out[-1].parameters():
            p.zero_()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class PixelCodec:
    """The VAE slot: IMAGE (B, H, W, 3) in [0, 1] <-> latent (B, 3*F*F, H/F, W/F), pixels in [-1, 1] folded by
    space-to-depth. Exactly invertible, and F*F times fewer positions for the UNet to work on (a CPU budget)."""

    def encode(self, pixels):
        return torch.nn.functional.pixel_unshuffle(pixels[..., :3].movedim(-1, 1).float() * 2.0 - 1.0, FACTOR)

    def decode(self, latent):
        x = torch.nn.functional.pixel_shuffle(latent.float(), FACTOR)
        return ((x + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)


class WordEncoder(nn.Module):
    """The domain's text encoder: a learned embedding per caption word plus a learned position. Trained with the
    base model, then frozen. tokenize / encode_from_tokens follow ComfyUI's CLIP object, so the trainer and the
    sampler use it as they use CLIP."""

    def __init__(self, dim: int = 64, length: int = 16):
        super().__init__()
        words = sorted({w for text in vocabulary_captions() for w in self.words(text)})
        self.vocab = {w: i + 1 for i, w in enumerate(words)}   # 0 pads
        self.length = length
        self.emb = nn.Embedding(len(words) + 1, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.1)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def tokenize(self, text: str) -> torch.Tensor:
        unknown = [w for w in self.words(text) if w not in self.vocab]
        if unknown:
            raise ValueError(f"caption '{text}' has words outside the synthetic vocabulary: {unknown}")
        ids = [self.vocab[w] for w in self.words(text)][: self.length]
        return torch.tensor([ids + [0] * (self.length - len(ids))])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens) + self.pos

    def encode_from_tokens(self, tokens, return_pooled=False):
        with torch.no_grad():
            cond = self(tokens)
        return (cond, None) if return_pooled else cond

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([self.encode_from_tokens(self.tokenize(t)) for t in texts])


def vocabulary_captions():
    scenes = [dict(zip(SCENE_ATTRS, c)) for c in itertools.product(*SCENE_ATTRS.values())]
    return [caption(s) for s in scenes] + [caption(s, two=True) for s in scenes] + ["a photo of a person"]


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
