"""Training data: a folder of images with .txt captions, optional identity subfolders and optional face masks.

    dataset/                     dataset/
      img001.png                   alice/  a1.png a1.txt a2.jpg a2.txt
      img001.txt                   bob/    b1.png b1.txt ...
      img001_mask.png  (optional: white = face; up-weights the face in the loss)

With identity subfolders, a sample's reference is another image of the same identity (when it has one);
otherwise the reference is the sample's own face region (its mask's box, else a centre crop), augmented.
Unreadable files (corrupt, not an image, a decompression bomb) are skipped, never fatal; `skipped` / `skip_reasons`
say which and why, and the Train node shows them. 16-bit and float images are scaled to 8 bits, not clipped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger("IDFusion")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Pixels one training image may declare, checked on its header before it is decoded: 8192x8192 (~200 MB as RGB).
# Pillow's own bomb check refuses only beyond 179 M pixels and merely warns from 89 M; training crops to <= 2048 px.
MAX_PIXELS = 8192 * 8192


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB with its tones kept. Pillow's convert("RGB") clips 16-bit and 32-bit greyscale
    (I;16, I) at 255, which turned a 16-bit PNG almost all white; those are scaled instead (0..65535 -> 0..255), and
    float images (F) read as 0..1 when they stay in it, else 0..255."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        elif mode.startswith("I;16") or np.max(a, initial=0) > 255:  # "I" holding 16-bit samples (some decoders)
            a = a / 257.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def to_l(im: Image.Image) -> Image.Image:
    """A mask in any mode as 8-bit greyscale (16-bit masks scaled, as to_rgb does)."""
    return to_rgb(im).convert("L") if im.mode.startswith("I;16") or im.mode in ("I", "F") else im.convert("L")


def check_image(path: str) -> str | None:
    """None when the file decodes to an image training can use, else why not (for the skipped-files report)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                return f"{w}x{h} pixels, more than the {MAX_PIXELS // 1_000_000} M pixels a training image may have"
            im.load()
            to_rgb(im)
        return None
    except Image.DecompressionBombError:
        return "a decompression bomb (Pillow refused its declared size)"
    except Exception as e:  # Pillow raises many types for corrupt or truncated files
        what = "not a readable image" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        return what[:200]


@dataclass
class Sample:
    image: str
    caption: str
    identity: str
    mask: str | None


class FaceDataset:
    def __init__(self, root: str, resolution: int = 512, reference_resolution: int | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Training dataset folder '{root}' does not exist.")
        self.root, self.resolution = root, resolution
        self.reference_resolution = reference_resolution or resolution
        self.samples: list[Sample] = []
        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}  # path -> why it was skipped
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() not in IMAGE_EXTS or stem.endswith("_mask"):
                    continue
                path = os.path.join(dirpath, f)
                problem = check_image(path)
                if problem:
                    self.skipped.append(path)
                    self.skip_reasons[path] = problem
                    continue
                cap_path = os.path.join(dirpath, stem + ".txt")
                caption = open(cap_path, encoding="utf-8", errors="replace").read().strip() if os.path.isfile(cap_path) else ""
                masks = [os.path.join(dirpath, stem + "_mask" + e) for e in (".png", ".jpg")]
                mask = None
                for m in (m for m in masks if os.path.isfile(m)):
                    problem = check_image(m)
                    if problem is None:
                        mask = m
                        break
                    self.skipped.append(m)
                    self.skip_reasons[m] = f"mask: {problem}"
                identity = os.path.relpath(dirpath, root)
                self.samples.append(Sample(path, caption, identity, mask))
        if self.skipped:
            log.warning("IDFusion training: skipped %d file(s): %s", len(self.skipped), "; ".join(self.skipped_report(5)))
        if not self.samples:
            raise ValueError(f"Training dataset folder '{root}' has no readable images ({len(self.skipped)} skipped).")
        self.by_identity: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            self.by_identity.setdefault(s.identity, []).append(i)

    def skipped_report(self, limit: int = 20) -> list[str]:
        """One line per skipped file (path relative to the dataset, and why), at most `limit` plus a count."""
        lines = [f"{os.path.relpath(p, self.root)}: {self.skip_reasons.get(p, 'unreadable')}" for p in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"... and {len(self.skipped) - limit} more")
        return lines

    def __len__(self):
        return len(self.samples)

    def _square(self, im: Image.Image, size: int) -> Image.Image:
        return ImageOps.fit(im, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))

    def load(self, index: int, generator: torch.Generator, same_image_reference: bool = False,
             augment: dict | None = None) -> dict:
        """image (H, W, 3) float in [0, 1], caption, mask (H, W) or None, reference (h, w, 3); `augment` (shift,
        noise, background: TrainConfig.augmentation) changes the reference only."""
        s = self.samples[index]
        with Image.open(s.image) as im:
            image = self._square(to_rgb(ImageOps.exif_transpose(im)), self.resolution)
        mask = None
        if s.mask:
            with Image.open(s.mask) as m:
                mask = self._square(to_l(m), self.resolution)
        others = [i for i in self.by_identity[s.identity] if i != index] if s.identity != "." else []
        if others and not same_image_reference:
            j = others[int(torch.randint(len(others), (1,), generator=generator))]
            with Image.open(self.samples[j].image) as im:
                reference = self._square(to_rgb(ImageOps.exif_transpose(im)), self.reference_resolution)
            ref_mask = None
            if self.samples[j].mask and augment and augment.get("background"):
                with Image.open(self.samples[j].mask) as m:
                    ref_mask = self._square(to_l(m), self.reference_resolution)
        else:
            reference = self._face_crop(image, mask, generator)
            ref_mask = None   # the crop's own mask would need the same crop: no background change here
        to = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        ref = to(reference)
        if augment and any(augment.values()):   # no draws otherwise: runs without it stay bit for bit as before
            ref = augment_reference(ref, to(ref_mask) if ref_mask is not None else None, generator, **augment)
        return {"image": to(image), "caption": s.caption, "mask": to(mask) if mask is not None else None,
                "reference": ref, "identity": s.identity}

    def _face_crop(self, image: Image.Image, mask: Image.Image | None, generator: torch.Generator) -> Image.Image:
        """The sample's own face region, jittered in position and scale (augmentation), flipped at random."""
        W, H = image.size
        box = mask.getbbox() if mask is not None else None
        if box is None:
            box = (W // 4, H // 4, 3 * W // 4, 3 * H // 4)
        x0, y0, x1, y1 = box
        r = torch.rand(4, generator=generator).tolist()
        side = max(x1 - x0, y1 - y0) * (1.1 + 0.3 * r[0])
        cx, cy = (x0 + x1) / 2 + (r[1] - 0.5) * 0.1 * side, (y0 + y1) / 2 + (r[2] - 0.5) * 0.1 * side
        crop = image.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
        crop = crop.resize((self.reference_resolution, self.reference_resolution), Image.BICUBIC)
        return ImageOps.mirror(crop) if r[3] < 0.5 else crop


def augment_reference(ref: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator, shift: float = 0.0,
                      noise: float = 0.0, background: float = 0.0) -> torch.Tensor:
    """ref (H, W, 3) in [0, 1] -> the same, augmented: with chance `background` the pixels outside `mask` (H, W;
    white = the person) take one random colour; then moved by up to `shift` of its side in x and y (edge pixels
    repeated, whole pixels); then Gaussian noise of sd `noise` (0-255 units), clipped. Every draw comes from
    `generator`, so a resumed run draws what an uninterrupted one would."""
    H, W, _ = ref.shape
    r = torch.rand(3, generator=generator).tolist()
    colour = torch.rand(3, generator=generator)
    if mask is not None and r[0] < background:
        m = mask[..., None].clamp(0, 1)
        ref = ref * m + colour * (1 - m)
    if shift > 0:
        dy, dx = round((2 * r[1] - 1) * shift * H), round((2 * r[2] - 1) * shift * W)
        ys = (torch.arange(H) - dy).clamp(0, H - 1)
        xs = (torch.arange(W) - dx).clamp(0, W - 1)
        ref = ref[ys][:, xs]
    if noise > 0:
        ref = (ref + torch.randn(ref.shape, generator=generator) * (noise / 255.0)).clamp(0, 1)
    return ref
