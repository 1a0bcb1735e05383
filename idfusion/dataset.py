"""Training data: a folder of images with .txt captions, optional identity subfolders and optional face masks.

    dataset/                     dataset/
      img001.png                   alice/  a1.png a1.txt a2.jpg a2.txt
      img001.txt                   bob/    b1.png b1.txt ...
      img001_mask.png  (optional: white = face; up-weights the face in the loss)

With identity subfolders, a sample's reference is another image of the same identity (when it has one);
otherwise the reference is the sample's own face region (its mask's box, else a centre crop), augmented.
Unreadable files are skipped and counted, never fatal.
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
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() not in IMAGE_EXTS or stem.endswith("_mask"):
                    continue
                path = os.path.join(dirpath, f)
                if not self._readable(path):
                    self.skipped.append(path)
                    continue
                cap_path = os.path.join(dirpath, stem + ".txt")
                caption = open(cap_path, encoding="utf-8", errors="replace").read().strip() if os.path.isfile(cap_path) else ""
                masks = [os.path.join(dirpath, stem + "_mask" + e) for e in (".png", ".jpg")]
                mask = next((m for m in masks if os.path.isfile(m) and self._readable(m)), None)
                identity = os.path.relpath(dirpath, root)
                self.samples.append(Sample(path, caption, identity, mask))
        if self.skipped:
            log.warning("IDFusion training: skipped %d unreadable file(s), e.g. %s", len(self.skipped), self.skipped[0])
        if not self.samples:
            raise ValueError(f"Training dataset folder '{root}' has no readable images ({len(self.skipped)} skipped).")
        self.by_identity: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            self.by_identity.setdefault(s.identity, []).append(i)

    @staticmethod
    def _readable(path: str) -> bool:
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except Exception:
            return False

    def __len__(self):
        return len(self.samples)

    def _square(self, im: Image.Image, size: int) -> Image.Image:
        return ImageOps.fit(im, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))

    def load(self, index: int, generator: torch.Generator, same_image_reference: bool = False) -> dict:
        """image (H, W, 3) float in [0, 1], caption, mask (H, W) or None, reference (h, w, 3)."""
        s = self.samples[index]
        with Image.open(s.image) as im:
            image = self._square(ImageOps.exif_transpose(im).convert("RGB"), self.resolution)
        mask = None
        if s.mask:
            with Image.open(s.mask) as m:
                mask = self._square(m.convert("L"), self.resolution)
        others = [i for i in self.by_identity[s.identity] if i != index] if s.identity != "." else []
        if others and not same_image_reference:
            j = others[int(torch.randint(len(others), (1,), generator=generator))]
            with Image.open(self.samples[j].image) as im:
                reference = self._square(ImageOps.exif_transpose(im).convert("RGB"), self.reference_resolution)
        else:
            reference = self._face_crop(image, mask, generator)
        to = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        return {"image": to(image), "caption": s.caption, "mask": to(mask) if mask is not None else None,
                "reference": to(reference), "identity": s.identity}

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
