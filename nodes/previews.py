"""Node previews for the stock frontend: a PNG in ComfyUI's temp folder, returned as {"ui": {"images": [...]}} so the
node shows it (as PreviewImage does). The server draws; the page only displays, so API users lose nothing."""
from __future__ import annotations

import os
import random
import string

import numpy as np
import torch

from ..idfusion import fusion
from ..idfusion.faces import PALETTE

MAX_SIDE = 512          # previews are for the eye: larger masks are shown downscaled, which keeps the PNG cheap
OUTSIDE = (40, 40, 40)  # queries outside every region see every identity


def region_overlay(regions: list[torch.Tensor]) -> np.ndarray:
    """(H, W, 3) uint8: each identity's region as the layers read it (fusion.region_tokens at the mask's own
    resolution: area > 0.5, or the best-covered pixels of a faint mask) in its PALETTE colour, identity order;
    pixels in several regions get the mean of their colours, pixels outside all regions dark grey."""
    h, w = regions[0].shape[-2:]
    scale = min(1.0, MAX_SIDE / max(h, w))
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    inside = torch.stack([fusion.region_tokens(r.float(), ph, pw).reshape(ph, pw) for r in regions]).numpy()  # (n, ph, pw)
    colours = np.array([PALETTE[i % len(PALETTE)] for i in range(len(regions))], np.float32)                  # (n, 3)
    count = inside.sum(0)[..., None]
    mixed = np.einsum("nhw,nc->hwc", inside.astype(np.float32), colours) / np.maximum(count, 1)
    out = np.where(count > 0, mixed, np.array(OUTSIDE, np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_temp_png(rgb: np.ndarray, prefix: str) -> dict:
    """Write rgb (H, W, 3) uint8 to ComfyUI's temp folder (at most MAX_SIDE pixels on its longer side; written to a
    side file, then renamed); returns the entry the frontend loads through /view."""
    import folder_paths
    from PIL import Image
    image = Image.fromarray(rgb)
    if max(image.size) > MAX_SIDE:
        s = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BILINEAR)
    prefix = prefix + "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), image.width, image.height)
    name = f"{filename}_{counter:05}_.png"
    path = os.path.join(folder, name)
    image.save(path + ".part", format="PNG", compress_level=1)
    os.replace(path + ".part", path)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


def region_legend(labels: list[str]) -> list[dict]:
    """ui output 'idfusion_regions': [{label, color}] in identity order, the colours region_overlay uses (the
    frontend's legend reads it; the picture alone already carries the colours)."""
    return [{"label": label, "color": "#%02x%02x%02x" % PALETTE[i % len(PALETTE)]} for i, label in enumerate(labels)]
