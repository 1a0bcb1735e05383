"""Example inputs that ship with the pack, so every template runs on a fresh install with nothing copied into
ComfyUI/input: the reference faces in workflows/assets/ (the synthetic model's faces in workflows/assets/synthetic/,
and the cartoon face for SD checkpoints). The list is read from the folder when the node list is built, never
hard-coded, so renamed or added faces show up after a refresh."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .common import CATEGORY
from .previews import save_temp_png

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(PACK, "workflows", "assets")
FACE_FOLDERS = (os.path.join(ASSETS, "synthetic"), ASSETS)  # listed in this order: the synthetic faces first


def example_faces() -> dict[str, str]:
    """{list name: path} of the shipped reference faces (PNG files directly in each folder; a name seen twice keeps
    its first folder)."""
    faces = {}
    for folder in FACE_FOLDERS:
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(".png") and os.path.isfile(os.path.join(folder, f)):
                    faces.setdefault(f, os.path.join(folder, f))
    return faces


def _input_file(name: str) -> str | None:
    """A file in ComfyUI's input folder (scripts and the batch runner upload a reference and name it here), never a
    path that leaves that folder."""
    import folder_paths
    if not isinstance(name, str) or not name or not folder_paths.exists_annotated_filepath(name):
        return None
    path = os.path.abspath(folder_paths.get_annotated_filepath(name))
    roots = [os.path.abspath(folder_paths.get_directory_by_type(t)) for t in ("input", "output", "temp")]
    return path if any(os.path.commonpath([path, r]) == r for r in roots) else None


def _resolve(name: str) -> str | None:
    return example_faces().get(name) or _input_file(name)


class IDFusionExampleReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (list(example_faces()), {
            "tooltip": "A reference face that ships with the pack (workflows/assets/): fresh_* are people no "
                       "model saw in training, extrapolation_* have hair hues no training face had; "
                       "reference_face.png is a cartoon face for SD checkpoints. For your own photo use Load Image "
                       "instead. Over the API, a file in ComfyUI's input folder is accepted too."})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/examples"
    DESCRIPTION = ("One of the reference faces that ship with the pack, so the templates run without copying files into "
                   "ComfyUI/input. The mask is the picture's alpha (as Load Image gives it), empty when it has none.")

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        # checked before anything runs, so a renamed or missing face stops the whole prompt with this message in the UI
        if _resolve(image) is None:
            names = ", ".join(example_faces()) or "none found"
            return (f"Reference image '{image}' is neither one of the pack's example faces ({names}) nor a file in "
                    "ComfyUI's input folder: pick one from the list, or use Load Image for your own photo.")
        return True

    @classmethod
    def IS_CHANGED(cls, image):
        path = _resolve(image)
        if path is None:
            return image
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def load(self, image):
        path = _resolve(image)
        if path is None:
            raise FileNotFoundError(self.VALIDATE_INPUTS(image))
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0 if "A" in im.getbands() else None
        picture = torch.from_numpy(rgb)[None]                                             # (1, H, W, 3)
        mask = torch.from_numpy(1.0 - alpha)[None] if alpha is not None else torch.zeros(picture.shape[:3])
        preview = save_temp_png((rgb * 255 + 0.5).astype(np.uint8), "idfusion_example")  # shown on the node
        return {"ui": {"images": [preview]}, "result": (picture, mask)}


NODE_CLASS_MAPPINGS = {"IDFusionExampleReference": IDFusionExampleReference}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionExampleReference": "IDFusion Example Reference Face"}
