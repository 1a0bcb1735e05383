"""Face nodes: load face analysis (insightface packs or the OpenCV Haar fallback), crop/align a chosen face,
and build identity masks from detected faces for IDFusion Apply Multi-Identity."""
import logging
import os

import folder_paths
import numpy as np
import torch

from ..idfusion import faces as F
from .common import CATEGORY, check_inputs, require_inputs
from .previews import region_legend, save_temp_png

log = logging.getLogger("IDFusion")

# models/insightface, the folder IPAdapter/InstantID/PuLID users already have (packs in models/insightface/models/<pack>)
FACE_FOLDER = "insightface"
folder_paths.add_model_folder_path(FACE_FOLDER, os.path.join(folder_paths.models_dir, FACE_FOLDER))
NO_FACE = ["error", "whole image", "skip"]
FACE_ANALYSIS = "IDFUSION_FACE_ANALYSIS"
BBOX = "IDFUSION_BBOX"
MAX_IDENTITIES = 4


def face_roots():
    return folder_paths.get_folder_paths(FACE_FOLDER)


def to_uint8(image: torch.Tensor) -> list:
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> list of RGB uint8 arrays."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image must be an IMAGE batch (B, H, W, 3), got shape {tuple(image.shape)}.")
    arr = (image[..., :3].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return list(arr)


def to_image(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def run(fn, *a, **k):
    """Library errors already say what to do; re-raise them as ValueError so ComfyUI shows the message plainly."""
    try:
        return fn(*a, **k)
    except F.FaceToolError as e:
        raise ValueError(str(e)) from None


def blocker():
    """ComfyUI's ExecutionBlocker (present on both pinned hosts): nodes fed by this output do not run."""
    from comfy_execution.graph_utils import ExecutionBlocker
    return ExecutionBlocker(None)


_ORDER = (list(F.ORDERS), {"tooltip": "How faces are numbered: by size (largest first), by horizontal position "
                           "(left to right) or by detector confidence (most confident first)."})
_INDEX = ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "Which face in that order (0 = first)."})


class IDFusionFaceAnalysisLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (F.available_packs(face_roots()) + [F.HAAR], {"tooltip":
                      "insightface pack from ComfyUI/models/insightface/models/<name>/ (never downloaded), or the OpenCV Haar "
                      "fallback: finds frontal faces for crops and masks without any model files, but gives no identity embedding."}),
            "provider": (list(F.PROVIDERS), {"tooltip": "onnxruntime execution provider for the insightface models. CPU always "
                         "works; CUDA needs onnxruntime-gpu, ROCm onnxruntime-rocm, DirectML onnxruntime-directml. Ignored by the Haar fallback."}),
            "det_size": ("INT", {"default": 640, "min": 0, "max": 2048, "step": 32, "tooltip":
                         "Detector input size (square). 0 = insightface's default (128 and 640, merged). Fixed-size detectors ignore this."}),
            "det_thresh": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 0.99, "step": 0.01, "tooltip":
                           "Minimum detector confidence for a face (insightface only)."}),
        }}

    RETURN_TYPES = (FACE_ANALYSIS,)
    RETURN_NAMES = ("face_analysis",)
    OUTPUT_TOOLTIPS = ("Detector (+ ArcFace recognizer with insightface packs) for the IDFusion face nodes.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads face detection and ArcFace recognition from an insightface pack (antelopev2, buffalo_l) in "
                   "models/insightface, or the OpenCV Haar fallback (no downloads, no identity embedding).")

    @classmethod
    def VALIDATE_INPUTS(cls, det_thresh=None):
        # JSON NaN passes ComfyUI's own min/max check (every comparison with NaN is false): refuse it when queued
        return check_inputs(cls, det_thresh=det_thresh)

    def load(self, model, provider, det_size, det_thresh):
        require_inputs(type(self), det_size=det_size, det_thresh=det_thresh)  # linked values and Python callers
        if model == F.HAAR:
            return (run(F.load_haar),)
        return (run(F.load_insightface, model, face_roots(), provider, det_size, det_thresh),)


class IDFusionFaceCrop:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "From IDFusion Load Face Analysis."}),
            "image": ("IMAGE", {"tooltip": "Photo(s) to crop a face from; each image of the batch is handled on its own."}),
            "order": _ORDER,
            "index": _INDEX,
            "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Side of the square output crop in pixels."}),
            "margin": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                       "How much around the face to keep: 0 = insightface's tight ArcFace crop; 0.6 shows hair and chin."}),
            "no_face": (NO_FACE, {"tooltip": "When an image has no face (or fewer than index+1): 'error' stops the prompt; "
                        "'whole image' uses its centre square instead; 'skip' leaves that image out of crops (if no image has a "
                        "face, nodes fed by crops do not run at all)."}),
        }}

    RETURN_TYPES = ("IMAGE", BBOX, "IMAGE", "MASK")
    RETURN_NAMES = ("crops", "bbox", "preview", "face_mask")
    OUTPUT_TOOLTIPS = ("Aligned face crops (eyes level when the detector gives landmarks), one per image with a face.",
                       "Per input image: the chosen face's box (x1, y1, x2, y2) in its pixels, or None when it had none.",
                       "The input with every face outlined and the chosen one in thick green.",
                       "The chosen face's box as a mask on each input image (zero when none).")
    FUNCTION = "crop"
    CATEGORY = CATEGORY
    DESCRIPTION = "Finds the faces, picks one by order and index, and returns an aligned square crop for Encode Reference Face."

    @classmethod
    def VALIDATE_INPUTS(cls, margin=None):
        return check_inputs(cls, margin=margin)  # NaN passes ComfyUI's min/max check

    def crop(self, face_analysis, image, order, index, size, margin, no_face):
        require_inputs(type(self), index=index, size=size, margin=margin)
        crops, boxes, previews, masks = [], [], [], []
        for n, rgb in enumerate(to_uint8(image)):
            faces = run(face_analysis.detect, rgb)
            face = run(F.pick, faces, order, index)
            h, w = rgb.shape[:2]
            previews.append(F.draw_preview(rgb, faces, face))
            if face is None:
                what = f"image {n} of the batch has {len(faces)} face(s), so there is no face at index {index} ({order})"
                if no_face == "error":
                    raise ValueError(f"{what}. Lower index, use another image, or set no_face to 'whole image' or 'skip'.")
                log.warning("IDFusion Face Crop: %s; %s.", what, "using the whole image" if no_face == "whole image" else "skipped")
                boxes.append(None)
                masks.append(np.zeros((h, w), np.float32))
                if no_face == "whole image":
                    crops.append(F.whole_image_crop(rgb, size))
                continue
            boxes.append(tuple(float(v) for v in face.bbox))
            masks.append(F.box_mask(h, w, face.bbox, 0.0, 0))
            crops.append(F.warp(rgb, F.crop_matrix(face, size, margin), size))
        return (to_image(crops) if crops else blocker(), boxes, to_image(previews), torch.from_numpy(np.stack(masks)))


class IDFusionFaceMasks:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Layout or pose image with the people placed where they should appear "
                      "(the first image of a batch is used); masks come out at its size, like the latent's."}),
            "identities": ("INT", {"default": 2, "min": 1, "max": MAX_IDENTITIES, "tooltip":
                           "How many identities (masks) to make: one per identity input of Apply Multi-Identity."}),
            "order": (list(F.ORDERS), {"default": "left to right", "tooltip":
                      "Which face is identity 1, 2, ...: left to right (default), largest first, or most confident first. "
                      "With more faces than identities, the largest ones are kept."}),
            "margin": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                       "Grow each face box by this fraction of its size on every side (hair, neck)."}),
            "feather": ("INT", {"default": 8, "min": 0, "max": 256, "tooltip": "Soft edge in pixels outside the grown box."}),
        }, "optional": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "Detector to use; without it the OpenCV Haar fallback is used."}),
            "user_masks": ("MASK", {"tooltip": "Your own masks (one per identity, in order): used instead of detection, "
                           "then resized to the image and feathered."}),
        }}

    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "preview")
    OUTPUT_TOOLTIPS = ("One mask per identity, in identity order: connect to Apply Multi-Identity's masks.",
                       "The image with each identity's region tinted in its own colour (red, green, blue, orange = identity 1-4).")
    FUNCTION = "masks_with_preview"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Region masks for multi-identity generation from the faces on a layout image (or from your masks). The node "
                   "shows the layout with each identity's region tinted in its colour.")

    @classmethod
    def VALIDATE_INPUTS(cls, margin=None):
        return check_inputs(cls, margin=margin)  # NaN passes ComfyUI's min/max check

    def masks_with_preview(self, image, identities, order, margin, feather, face_analysis=None, user_masks=None):
        """What ComfyUI calls: masks() plus the tinted layout as a temp PNG the frontend shows on the node."""
        masks, preview = self.masks(image, identities, order, margin, feather, face_analysis, user_masks)
        rgb = (preview[0].numpy() * 255.0 + 0.5).astype(np.uint8)
        return {"ui": {"images": [save_temp_png(rgb, "IDFusion_face_masks")],
                       "idfusion_regions": region_legend([f"identity {i + 1}" for i in range(masks.shape[0])])},
                "result": (masks, preview)}

    def masks(self, image, identities, order, margin, feather, face_analysis=None, user_masks=None):
        require_inputs(type(self), identities=identities, margin=margin, feather=feather)
        rgb = to_uint8(image[:1])[0]
        h, w = rgb.shape[:2]
        if user_masks is not None:
            um = user_masks if user_masks.ndim == 3 else user_masks[None]
            if um.shape[0] != identities:
                raise ValueError(f"user_masks has {um.shape[0]} mask(s) but identities is {identities}: give one mask per identity.")
            um = torch.nn.functional.interpolate(um[:, None].float().cpu(), size=(h, w), mode="bilinear")[:, 0].clamp(0, 1)
            ms = [F.feather_mask(m.numpy().astype(np.float32), feather) for m in um]
        else:
            fa = face_analysis if face_analysis is not None else run(F.load_haar)
            faces = run(fa.detect, rgb)
            if len(faces) < identities:
                raise ValueError(f"Found {len(faces)} face(s) in image but identities is {identities}. Use a layout image "
                                 f"with one clear face per person, lower identities, or connect user_masks.")
            chosen = F.order_faces(F.order_faces(faces, "largest")[:identities], order)
            ms = [F.box_mask(h, w, f.bbox, margin, feather) for f in chosen]
        masks = np.stack(ms).astype(np.float32)
        return (torch.from_numpy(masks), to_image([F.mask_preview(rgb, masks)]))


NODE_CLASS_MAPPINGS = {"IDFusionFaceAnalysisLoader": IDFusionFaceAnalysisLoader, "IDFusionFaceCrop": IDFusionFaceCrop,
                       "IDFusionFaceMasks": IDFusionFaceMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionFaceAnalysisLoader": "IDFusion Load Face Analysis",
                              "IDFusionFaceCrop": "IDFusion Face Crop",
                              "IDFusionFaceMasks": "IDFusion Face Masks (multi-identity)"}
