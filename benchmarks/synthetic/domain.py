"""A continuous synthetic identity domain small enough to train on a CPU, and a renderer that can be fitted back to a
picture (benchmarks/synthetic/fit.py) to measure what a generation shows.

An identity is a point in a continuous 16-dimensional space: skin, hair and eye colour (CIELAB, anywhere in the
ranges below, not a palette) and seven shape parameters (face width and height, eye spacing, eye size, mouth width,
hair volume, fringe depth). Expression, pose and background vary from picture to picture and the caption describes
only those, so a base model trained on captions alone draws a random identity: only the adapter's reference can say
whose face to draw. Identities are drawn fresh for every split (training, validation, evaluation), and the
extrapolation split takes its hair from a hue band that no training identity has.

The renderer is written in torch with soft (sigmoid) edges, so the same function draws the training pictures and is
differentiated when the instrument fits it to a generated picture. Faces are 64-81 px wide in a 96 px picture.
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import torch

SIZE = 96           # pixels per face picture; a two-person picture is 2*SIZE wide
FACTOR = 8          # the UNet works on 8x8 space-to-depth patches: a 12x12x192 latent (pool 1: ComfyUI's width/8)
POOL = 8 // FACTOR
PICTURE = SIZE * POOL
TAU = 0.5           # edge softness of the drawn pictures, pixels (about one pixel of anti-aliasing)

# ---- identity space ------------------------------------------------------------------------------------------
# colours as CIELAB boxes (skin) or LCh ranges (hair, eyes); geometry as fractions of SIZE. Stated once, used by
# every split, the fit's bounds and the report.
SKIN_LAB = {"L": (35.0, 85.0), "a": (5.0, 30.0), "b": (8.0, 40.0)}
HAIR_LCH = {"L": (12.0, 88.0), "C": (0.0, 60.0)}
EYES_LCH = {"L": (20.0, 65.0), "C": (0.0, 50.0)}
HAIR_HUE_BAND = (120.0, 200.0)       # degrees: green to cyan hair; no training identity's hair is in this band
GEOMETRY = {                         # name: (low, high) as a fraction of SIZE
    "face_w": (0.335, 0.42),         # face semi-axis across: faces 64-81 px wide
    "face_h": (0.37, 0.44),          # face semi-axis down
    "eye_spacing": (0.12, 0.21),     # each eye's offset from the face's centre line
    "eye_size": (0.035, 0.06),       # eye radius
    "mouth_w": (0.07, 0.15),         # mouth half-width
    "hair_volume": (0.02, 0.10),     # how far the hair stands out beyond the face
    "fringe": (0.10, 0.30),          # fringe depth, as a fraction of the face height
}
COLOURS = ("skin", "hair", "eyes")
IDENTITY_DIMS = [f"{c}_{ch}" for c in COLOURS for ch in "Lab"] + list(GEOMETRY)   # 16

EXPRESSIONS = ["smiling", "neutral", "crying", "surprised"]
POSES = {"facing left": -0.06, "facing front": 0.0, "facing right": 0.06}   # features shift with the head turn
BACKGROUNDS = {"purple": (112, 56, 160), "teal": (36, 136, 136), "orange": (236, 136, 36), "grey": (128, 128, 128)}
SCENE_ATTRS = {"expression": EXPRESSIONS, "pose": list(POSES), "background": list(BACKGROUNDS)}
JITTER = 0.04                        # training range of the face position, fraction of SIZE
EYE_WHITE, LIPS, MOUTH_INSIDE, TEARS = (250, 250, 250), (150, 30, 40), (60, 10, 20), (120, 190, 255)


# ---- colour ------------------------------------------------------------------------------------------------
_M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_srgb(lab) -> np.ndarray:
    """(..., 3) CIELAB -> sRGB, unclipped (values outside [0, 1] are out of gamut)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = xyz @ np.linalg.inv(_M).T
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) * np.sign(lin) - 0.055)


def delta_e(lab1, lab2) -> np.ndarray:
    """CIE76 colour difference (Euclidean in CIELAB)."""
    return np.linalg.norm(np.asarray(lab1) - np.asarray(lab2), axis=-1)


def hue(lab) -> np.ndarray:
    lab = np.asarray(lab)
    return np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360


def in_band(h, band=HAIR_HUE_BAND) -> np.ndarray:
    return (np.asarray(h) >= band[0]) & (np.asarray(h) <= band[1])


# ---- identities ----------------------------------------------------------------------------------------------
def _lch(rng, ranges, hue_range=(0.0, 360.0), avoid=None):
    while True:
        L, C = rng.uniform(*ranges["L"]), rng.uniform(*ranges["C"])
        h = rng.uniform(*hue_range)
        if avoid is not None and in_band(h, avoid):
            continue
        lab = np.array([L, C * math.cos(math.radians(h)), C * math.sin(math.radians(h))])
        if np.all((lab_to_srgb(lab) >= 0) & (lab_to_srgb(lab) <= 1)):
            return lab


def random_identity(rng, extrapolate: bool = False) -> dict:
    """One identity: {"skin"|"hair"|"eyes": CIELAB (3,), geometry name: fraction of SIZE}. Ordinary identities never
    have hair in HAIR_HUE_BAND; extrapolation identities always do, with chroma 35 or more so the hue shows."""
    while True:
        skin = np.array([rng.uniform(*SKIN_LAB[k]) for k in "Lab"])
        if np.all((lab_to_srgb(skin) >= 0) & (lab_to_srgb(skin) <= 1)):
            break
    if extrapolate:
        hair = _lch(rng, {"L": (35.0, 75.0), "C": (35.0, 60.0)}, HAIR_HUE_BAND)
    else:
        hair = _lch(rng, HAIR_LCH, avoid=HAIR_HUE_BAND)
    eyes = _lch(rng, EYES_LCH)
    return {"skin": skin, "hair": hair, "eyes": eyes, **{k: float(rng.uniform(*r)) for k, r in GEOMETRY.items()}}


SPLIT_SEEDS = {"training": 1, "validation": 2, "evaluation": 3, "candidates": 4, "extrapolation": 5}


def identities(split: str, n: int) -> list[dict]:
    """n identities of a split. Each split has its own seed, so evaluation identities are fresh draws that neither the
    base model nor the adapter saw (the chance that two continuous draws coincide is zero)."""
    rng = np.random.default_rng(1000 + SPLIT_SEEDS[split])
    return [random_identity(rng, extrapolate=split == "extrapolation") for _ in range(n)]


def identity_vector(ident: dict) -> np.ndarray:
    """(16,) in IDENTITY_DIMS order: CIELAB of the three colours, then the geometry."""
    return np.concatenate([ident["skin"], ident["hair"], ident["eyes"], [ident[k] for k in GEOMETRY]])


def from_vector(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return {"skin": v[0:3], "hair": v[3:6], "eyes": v[6:9], **{k: float(x) for k, x in zip(GEOMETRY, v[9:])}}


def identity_scale(mean: bool = False) -> np.ndarray:
    """Per-dimension spread (sd) of the identity prior, from 4096 draws of a dedicated seed: the units of the
    retrieval distance, fixed by the domain before any picture was measured (mean=True: the prior's mean)."""
    rng = np.random.default_rng(77)
    v = np.stack([identity_vector(random_identity(rng)) for _ in range(4096)])
    return v.mean(0) if mean else v.std(0)


def to_json(ident: dict) -> dict:
    return {k: ([round(float(x), 3) for x in v] if k in COLOURS else round(float(v), 5)) for k, v in ident.items()}


def from_json(d: dict) -> dict:
    return {k: (np.asarray(v, dtype=np.float64) if k in COLOURS else float(v)) for k, v in d.items()}


# ---- scenes and captions ---------------------------------------------------------------------------------------
def caption(scene: dict, two: bool = False) -> str:
    if two:
        return f"two people, {scene['expression']}, {scene['background']} background"
    return f"a photo of a person, {scene['expression']}, {scene['pose']}, {scene['background']} background"


def random_scene(rng) -> dict:
    return {k: v[rng.integers(len(v))] for k, v in SCENE_ATTRS.items()}


def all_scenes() -> list[dict]:
    return [dict(zip(SCENE_ATTRS, c)) for c in itertools.product(*SCENE_ATTRS.values())]


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


# Coarse words for an identity, the way people describe a face, for a base model trained with some captions carrying
# them, meant to steer identity through cross-attention as a real text-to-image model does (issue 17's pathway study:
# a base whose cross-attention only ever carried the scene passes little of K_f/V_f into the picture). Measured in
# caption_study.py: in the shipped base recipe's 4400 steps it barely learned them. Evaluation captions never carry
# them. Each modifier names one attribute alone and no scene word is reused ("violet", not "purple", a background):
# the word encoder has no context between words.
HAIR_HUES = [(25, "pink"), (50, "red"), (75, "ginger"), (120, "blonde"), (200, "green"), (275, "blue"),
             (335, "violet"), (360, "pink")]   # upper hue bound (degrees, CIELAB) -> word; "green" is HAIR_HUE_BAND
THIRDS = {"face_w": ("narrow", "broad"), "face_h": ("short", "long"), "eye_spacing": ("closeset", "wideset"),
          "eye_size": ("small", "big"), "mouth_w": ("thin", "wide"), "hair_volume": ("flat", "bushy"),
          "fringe": ("slight", "heavy")}
NOUNS = {"face_w": "face", "face_h": "face", "eye_spacing": "eyes", "eye_size": "eyes", "mouth_w": "mouth",
         "hair_volume": "hair", "fringe": "fringe"}


def descriptors(ident: dict) -> list[str]:
    """Every coarse description that fits an identity: skin by lightness, hair by colour name, eyes by lightness, and
    each shape parameter in the lower or upper third of its range ("broad face"; the middle third has no word)."""
    L, C, h = ident["hair"][0], math.hypot(*ident["hair"][1:]), float(hue(ident["hair"]))
    hair = ("black" if L < 35 else "white" if L > 70 else "silver") if C < 15 else \
        ("brown" if L < 40 and 25 <= h < 120 else next(w for top, w in HAIR_HUES if h < top))
    out = [("dark" if ident["skin"][0] < 52 else "tan" if ident["skin"][0] < 68 else "pale") + " skin",
           hair + " hair", "darkeyed" if ident["eyes"][0] < 42.5 else "lighteyed"]
    for k, (low, high) in THIRDS.items():
        lo, hi = GEOMETRY[k]
        x = (ident[k] - lo) / (hi - lo)
        if x < 1 / 3 or x > 2 / 3:
            out.append(f"{low if x < 1 / 3 else high} {NOUNS[k]}")
    return out


EYE_HUES = [(45, "redeyed"), (100, "ambereyed"), (170, "greeneyed"), (280, "blueeyed"), (335, "violeteyed"),
            (360, "redeyed")]   # upper hue bound (degrees, CIELAB) -> word, for eyes of chroma EYE_GREY_CHROMA or more
EYE_GREY_CHROMA = 15.0


def eye_words(ident: dict) -> list[str]:
    """The eye colour in two words, finer than descriptors' light/dark alone: its lightness word and a hue word
    ("greyeyed" below chroma EYE_GREY_CHROMA). eye_words_study.py trains a base on captions that name them."""
    lab = np.asarray(ident["eyes"])
    chroma, h = math.hypot(lab[1], lab[2]), float(hue(lab))
    return ["darkeyed" if lab[0] < 42.5 else "lighteyed",
            "greyeyed" if chroma < EYE_GREY_CHROMA else next(w for top, w in EYE_HUES if h < top)]


def described_caption(text: str, ident: dict, rng, most: int = 3) -> str:
    """A caption with 1..most of the identity's descriptions appended, in random order."""
    words = descriptors(ident)
    pick = rng.choice(len(words), size=min(len(words), int(rng.integers(1, most + 1))), replace=False)
    return ", ".join([text] + [words[i] for i in pick])


def vocabulary_captions(described: bool = False, eyes: bool = False):
    """Every caption the text encoder must know; described: with descriptors' words, eyes: with eye_words'."""
    scenes = all_scenes()
    extra = [f"{w} {n}" for k, ws in THIRDS.items() for w, n in zip(ws, [NOUNS[k]] * 2)] + \
        [f"{w} hair" for w in ("black", "white", "silver", "brown", *dict(HAIR_HUES).values()) if w != "green"] + \
        [f"{w} skin" for w in ("dark", "tan", "pale")] + ["darkeyed", "lighteyed"]
    return ([caption(s) for s in scenes] + [caption(s, two=True) for s in scenes] + ["a photo of a person"] +
            (extra if described else []) +
            (["darkeyed", "lighteyed", "greyeyed", *dict(EYE_HUES).values()] if eyes else []))


def vocabulary(described: bool = False, eyes: bool = False) -> list[str]:
    return sorted({w for text in vocabulary_captions(described, eyes) for w in re.findall(r"[a-z]+", text)})


# ---- the renderer ------------------------------------------------------------------------------------------------
def _cov(sdf, tau):
    """Soft coverage of a shape from its (approximate) signed distance in pixels: the anti-aliased edge."""
    return torch.sigmoid(-sdf / tau)


def _ellipse_sdf(x, y, cx, cy, a, b):
    """First-order signed distance to an ellipse (exact on its outline, where the edge is drawn)."""
    u, v = (x - cx) / a, (y - cy) / b
    k = torch.sqrt(u * u + v * v + 1e-9)
    grad = torch.sqrt((u / a) ** 2 + (v / b) ** 2 + 1e-12) / k
    return (k - 1) / grad


def _segment_sdf(x, y, x0, x1, yc):
    """Distance to the horizontal segment from (x0, yc) to (x1, yc)."""
    dx = torch.clamp(torch.maximum(x0 - x, x - x1), min=0)
    return torch.sqrt(dx * dx + (y - yc) ** 2 + 1e-9)


def layers(p: dict, x: torch.Tensor, y: torch.Tensor, tau: float):
    """The picture as a stack of layers, back to front: [(name, alpha (B, H, W), colour key)]. Colour keys name a
    free colour (background, hair, skin, eyes: read off the picture by the fit) or a fixed one.

    p: tensors (B,) in pixels: cx, cy (face centre), aw, ah (face semi-axes), turn, spacing, eye_r, mouth_w,
    hair_v, fringe (fraction of face height), and expression weights ex_smiling ... ex_surprised (one-hot when
    drawing). x, y: pixel-centre coordinates broadcastable to (B, H, W)."""
    e = lambda k: p[k][:, None, None]   # noqa: E731
    cx, cy, aw, ah, turn = e("cx"), e("cy"), e("aw"), e("ah"), e("turn")
    hv = e("hair_v")
    out = []
    top, bottom = cy - ah - 1.6 * hv, cy + 0.35 * ah
    out.append(("hair back", _cov(_ellipse_sdf(x, y, cx, (top + bottom) / 2, aw + hv, (bottom - top) / 2), tau), "hair"))
    face = _ellipse_sdf(x, y, cx, cy, aw, ah)
    out.append(("face", _cov(face, tau), "skin"))
    y_f = cy - ah + 2 * ah * e("fringe")
    out.append(("fringe", _cov(torch.maximum(face - 1.0, y - y_f), tau), "hair"))   # 1 px past the face edge: no seam
    r, ey = e("eye_r"), cy - 0.12 * ah
    for sx in (-1.0, 1.0):
        ex = cx + turn + sx * e("spacing")
        out.append(("eye white", _cov(_ellipse_sdf(x, y, ex, ey, 1.35 * r, r), tau), "eye white"))
        out.append(("iris", _cov(_ellipse_sdf(x, y, ex, ey, 0.8 * r, 0.8 * r), tau), "eyes"))
        tear = torch.maximum(torch.abs(x - ex) - 0.45 * r, torch.abs(y - (ey + r + 0.08 * SIZE)) - 0.08 * SIZE)
        out.append(("tear", _cov(tear, tau) * e("ex_crying"), "tears"))
    mx, my, mw = cx + turn, cy + 0.45 * ah, e("mouth_w")
    half = 0.018 * SIZE                                   # lip half-thickness
    ring = lambda yc, bh: torch.abs(_ellipse_sdf(x, y, mx, yc, mw, bh)) - half   # noqa: E731
    smile = torch.maximum(ring(my - 0.5 * mw, 0.6 * mw), (my - 0.5 * mw) - y)     # lower half of an ellipse ring
    frown = torch.maximum(ring(my + 0.6 * mw, 0.6 * mw), y - (my + 0.6 * mw))     # upper half
    line = _segment_sdf(x, y, mx - mw, mx + mw, my) - half
    out.append(("smile", _cov(smile, tau) * e("ex_smiling"), "lips"))
    out.append(("neutral", _cov(line, tau) * e("ex_neutral"), "lips"))
    out.append(("frown", _cov(frown, tau) * e("ex_crying"), "lips"))
    out.append(("open mouth", _cov(_ellipse_sdf(x, y, mx, my, 0.45 * mw, 0.55 * mw), tau) * e("ex_surprised"), "mouth inside"))
    return out


FIXED = {"eye white": EYE_WHITE, "tears": TEARS, "lips": LIPS, "mouth inside": MOUTH_INSIDE}
FREE = ("background", "hair", "skin", "eyes")


def visibility(stack):
    """Over-compositing weights: how much of each layer (and of the background) shows in each pixel.
    -> {colour key: (B, H, W)}, summing to 1 per pixel, so picture = sum colour * weight (linear in the colours)."""
    w = {}
    remaining = None
    for name, alpha, key in reversed(stack):
        vis = alpha if remaining is None else alpha * remaining
        w[key] = w.get(key, 0) + vis
        remaining = (1 - alpha) if remaining is None else remaining * (1 - alpha)
    w["background"] = remaining
    return w


def composite(weights: dict, colours: dict) -> torch.Tensor:
    """weights {key: (B, H, W)}, colours {key: (B, 3) in [0, 1]} -> (B, 3, H, W)."""
    return sum(colours[k][:, :, None, None] * w[:, None] for k, w in weights.items())


def grid(width: int, height: int = SIZE, device=None):
    """Pixel-centre coordinates (1, H, W)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(width, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return xs[None], ys[None]


def params(idents: list[dict], scenes: list[dict], jitter, offsets=None) -> dict:
    """Renderer parameters in pixels for one face per entry; offsets: the left edge of each face's square."""
    S = SIZE
    n = len(idents)
    offsets = np.zeros(n) if offsets is None else np.asarray(offsets, dtype=np.float64)
    jitter = np.asarray(jitter, dtype=np.float64).reshape(n, 2)
    g = lambda k: np.array([i[k] for i in idents]) * S   # noqa: E731
    p = {"cx": offsets + S / 2 + jitter[:, 0] * S, "cy": S * 0.53 + jitter[:, 1] * S, "aw": g("face_w"),
         "ah": g("face_h"), "turn": np.array([POSES[s["pose"]] for s in scenes]) * S, "spacing": g("eye_spacing"),
         "eye_r": g("eye_size"), "mouth_w": g("mouth_w"), "hair_v": g("hair_volume"),
         "fringe": np.array([i["fringe"] for i in idents])}
    for ex in EXPRESSIONS:
        p[f"ex_{ex}"] = np.array([float(s["expression"] == ex) for s in scenes])
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in p.items()}


def colours_of(idents: list[dict], backgrounds) -> dict:
    """Free and fixed colours (B, 3) in [0, 1]; backgrounds: names or RGB triples (0-255)."""
    rgb = lambda c: torch.tensor(np.clip(lab_to_srgb(np.stack([i[c] for i in idents])), 0, 1), dtype=torch.float32)  # noqa: E731
    bg = [BACKGROUNDS[b] if isinstance(b, str) else b for b in backgrounds]
    out = {"hair": rgb("hair"), "skin": rgb("skin"), "eyes": rgb("eyes"),
           "background": torch.tensor(bg, dtype=torch.float32) / 255}
    out.update({k: torch.tensor([v] * len(idents), dtype=torch.float32) / 255 for k, v in FIXED.items()})
    return out


def render_batch(faces: list[list[dict]], scenes: list[dict], jitter, backgrounds=None, tau: float = TAU):
    """Pictures of one or more faces side by side (every picture has the same number of faces), each face in its own
    SIZE x SIZE square. -> (pictures (B, 3, SIZE, n*SIZE) in [-1, 1], quantised to 8 bits like a saved PNG; face
    masks (B, SIZE, n*SIZE) in [0, 1]). jitter (B, n, 2); backgrounds: per picture a name or an RGB triple (0-255)
    to use instead of the scene's named background (a nuisance the captions cannot name)."""
    bgs = backgrounds or [s["background"] for s in scenes]
    pic = mask = None
    for idents, w in _faces_visible(faces, scenes, jitter, tau):   # each face over the picture so far (no overlaps)
        c = colours_of(idents, bgs)
        if pic is None:
            pic, mask = composite(w, c), 1 - w["background"]
        else:
            pic = pic * w["background"][:, None] + composite({k: v for k, v in w.items() if k != "background"}, c)
            mask = torch.maximum(mask, 1 - w["background"])
    return (pic.clamp(0, 1) * 255).round() / 127.5 - 1, mask


FEATURES = ("eye white", "eyes", "lips", "mouth inside")   # the small parts: 5 of the 16 identity dims live here


def _faces_visible(faces: list[list[dict]], scenes: list[dict], jitter, tau: float):
    """Each face slot of render_batch's pictures in turn -> (its identities, visibility weights {colour key: (B, H, W)})."""
    B, n = len(faces), len(faces[0])
    jitter = np.asarray(jitter, dtype=np.float64).reshape(B, n, 2)
    x, y = grid(SIZE * n)
    for i in range(n):
        idents = [f[i] for f in faces]
        p = params(idents, scenes, jitter[:, i], offsets=np.full(B, i * SIZE))
        yield idents, visibility(layers(p, x, y, tau))


def feature_map(faces: list[list[dict]], scenes: list[dict], jitter, keys=FEATURES, tau: float = TAU) -> torch.Tensor:
    """How much of each pixel the layers of colour keys `keys` cover, for the pictures render_batch draws from the same
    arguments -> (B, SIZE, n*SIZE) in [0, 1]."""
    out = torch.zeros(len(faces), SIZE, SIZE * len(faces[0]))
    for _, w in _faces_visible(faces, scenes, jitter, tau):
        out = torch.maximum(out, sum(w[k] for k in keys if k in w))
    return out


def render(idents: list[dict], scene: dict, rng=None, jitter=None, background=None, tau: float = TAU):
    """One picture (H, W, 3) uint8 of one or two faces side by side (the same scene), and its face mask (H, W).
    jitter: ((jx, jy), ...) per face (default: uniform in the training range)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if jitter is None:
        jitter = rng.uniform(-JITTER, JITTER, (len(idents), 2))
    pic, mask = render_batch([idents], [scene], jitter, [background] if background else None, tau)
    return to_uint8(pic)[0], mask[0].numpy().astype(np.float32)


# ---- the base model's pieces (the model itself lives in the pack: idfusion/synthetic.py) ------------------
def upscale(images: np.ndarray, pool: int = POOL) -> np.ndarray:
    """(..., H, W, 3) drawings at the model's resolution -> the pictures a user sees (each pixel pool x pool; the
    codec's pool, POOL for the shipped model)."""
    return images.repeat(pool, -3).repeat(pool, -2) if pool > 1 else images


def to_latent(x: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """Drawings (B, 3, H, W) in [-1, 1] -> latents; equal to the codec's encode of upscale(x) (the codec's factor)."""
    return torch.nn.functional.pixel_unshuffle(x, factor)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
