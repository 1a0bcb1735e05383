"""Two-stage face repaint (Dense-Face section 3.6): crop the face with context, repaint the crop with a KSampler
that uses the identity and a latent noise mask, then stitch it back with a feathered blend."""
import logging

import numpy as np
import torch
import torch.nn.functional as TF

from ..idfusion import faces as F
from .common import CATEGORY, check_inputs, require_inputs
from .face_nodes import FACE_ANALYSIS, _INDEX, _ORDER, run, to_uint8

log = logging.getLogger("IDFusion")
STITCH = "IDFUSION_STITCH"
SKIP = "skip (image unchanged)"


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, h, w, C); antialiased when shrinking."""
    if x.shape[1:3] == (h, w):
        return x
    y = TF.interpolate(x.movedim(-1, 1).float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.movedim(1, -1).clamp(0, 1)


class IDFusionFaceCropForRepaint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "From IDFusion Load Face Analysis (the Haar fallback works too)."}),
            "image": ("IMAGE", {"tooltip": "The first-stage image (batch of 1) whose face is repainted."}),
            "order": _ORDER,
            "index": _INDEX,
            "context": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 6.0, "step": 0.1, "tooltip":
                        "Side of the square crop as a multiple of the face box: context lets the sampler match lighting and pose."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                     "The crop is resized to this square size for the second pass (a multiple of 8: the latent grid)."}),
            "mask_margin": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                            "Grow the repainted region beyond the face box by this fraction of its size."}),
            "feather": ("INT", {"default": 16, "min": 0, "max": 256, "tooltip":
                        "Soft blend band in crop pixels outside the grown face box; everything outside it is kept exactly."}),
            "no_face": (["error", SKIP], {"tooltip": "No face (at that index): 'error' stops the prompt; 'skip' passes a "
                        "zero mask, and IDFusion Face Stitch returns the input image unchanged."}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK", STITCH)
    RETURN_NAMES = ("crop", "mask", "stitch")
    OUTPUT_TOOLTIPS = ("The face with context, size x size: VAE-encode it for the second pass.",
                       "Where to repaint inside the crop (feathered): feed to Set Latent Noise Mask.",
                       "Where the crop came from: connect to IDFusion Face Stitch.")
    FUNCTION = "crop"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Stage 2 of face repaint: crops the chosen face with context, returns the crop, a repaint mask and "
                   "a stitch handle. Sample the crop with IDFusion Apply + Set Latent Noise Mask, then IDFusion Face Stitch.")

    @classmethod
    def VALIDATE_INPUTS(cls, context=None, mask_margin=None):
        # JSON NaN passes ComfyUI's own min/max check; context inf reached int() in the crop box as a raw OverflowError
        return check_inputs(cls, context=context, mask_margin=mask_margin)

    def crop(self, face_analysis, image, order, index, context, size, mask_margin, feather, no_face):
        require_inputs(type(self), index=index, context=context, size=size, mask_margin=mask_margin, feather=feather)
        if image.shape[0] != 1:
            raise ValueError(f"image must be a single image (batch of 1) for repaint, got a batch of {image.shape[0]}.")
        rgb = to_uint8(image)[0]
        h, w = rgb.shape[:2]
        faces = run(face_analysis.detect, rgb)
        face = run(F.pick, faces, order, index)
        if face is None:
            what = f"the image has {len(faces)} face(s), none at index {index} ({order})"
            if no_face == "error":
                raise ValueError(f"{what}. Lower index, or set no_face to '{SKIP}'.")
            log.warning("IDFusion Face Crop For Repaint: %s; the image passes through unchanged.", what)
            crop = _resize(image[..., :3].float().cpu(), size, size)
            handle = F.StitchHandle(image.cpu(), None, None, size)
            return (crop, torch.zeros(1, size, size), handle)
        x1, y1, x2, y2 = F.context_box(face, h, w, context)
        side = x2 - x1
        rel = face.bbox - np.array([x1, y1, x1, y1], np.float64)
        # the blend mask lives in original pixels so the stitch is exact outside its band
        blend = torch.from_numpy(F.box_mask(side, side, rel, mask_margin, int(round(feather * side / size))))
        crop = _resize(image[:, y1:y2, x1:x2, :3].float().cpu(), size, size)
        mask = TF.interpolate(blend[None, None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        return (crop, mask, F.StitchHandle(image.cpu(), (x1, y1, x2, y2), blend, size))


class IDFusionFaceStitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stitch": (STITCH, {"tooltip": "From IDFusion Face Crop For Repaint."}),
            "repainted": ("IMAGE", {"tooltip": "The decoded second-pass crop (any size; resized back to the crop box)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The original image with the repainted face blended in; identical to it outside the feathered band.",)
    FUNCTION = "stitch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Blends a repainted face crop back into the original image with the feathered mask."

    def stitch(self, stitch, repainted):
        image = stitch.image
        if stitch.box is None:  # skipped: no face was found
            return (image,)
        x1, y1, x2, y2 = stitch.box
        new = _resize(repainted[:1, ..., :3].float().cpu(), y2 - y1, x2 - x1)[0]
        out = image.clone()
        region = out[0, y1:y2, x1:x2, :3]
        m = stitch.blend[..., None].to(region.dtype)
        # where the mask is 0 the original pixel is copied, not recomputed, so it stays bit-exact
        out[0, y1:y2, x1:x2, :3] = torch.where(m > 0, region * (1 - m) + new.to(region.dtype) * m, region)
        return (out,)


NODE_CLASS_MAPPINGS = {"IDFusionFaceCropForRepaint": IDFusionFaceCropForRepaint, "IDFusionFaceStitch": IDFusionFaceStitch}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionFaceCropForRepaint": "IDFusion Face Crop For Repaint",
                              "IDFusionFaceStitch": "IDFusion Face Stitch"}
