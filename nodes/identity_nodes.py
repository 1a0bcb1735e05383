"""Identity nodes: encode reference faces into per-layer h_f, save/load identity files, merge references."""
import os
import uuid

import comfy.utils
import folder_paths
import numpy as np
from PIL import Image

from ..idfusion.families import glue_for
from ..idfusion.identity import Identity, merge
from .common import CATEGORY, check_name, full_path, identity_files, new_identity_path


def thumbnails_ui(identity) -> dict:
    """The references' thumbnails as temp PNGs, listed like PreviewImage's output, so the stock frontend shows
    them under the node (and API users find them in the history)."""
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    images = []
    for r in range(identity.references):
        t = identity.thumbnail(r)
        if t is None:
            continue
        filename = f"IDFusion_reference_{tag}_{r + 1:02}.png"
        Image.fromarray(np.asarray(t.cpu())).save(os.path.join(folder, filename), compress_level=1)
        images.append({"filename": filename, "subfolder": "", "type": "temp"})
    return {"images": images}


COMPACT_CHOICE = "compact (h_f recomputed when applied)"
STORE = {COMPACT_CHOICE: False, "h_f (large, format 1)": True}  # choice -> Identity.save(with_h_f=...)


class IDFusionEncodeReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The same model you will sample with: the reference goes through its UNet."}),
            "vae": ("VAE", {"tooltip": "Encodes the reference images into latents."}),
            "reference_images": ("IMAGE", {"tooltip": "One or more photos of ONE person (a batch = several references, "
                                           "concatenated as in the paper's Eq. 6). Aligned face crops work best."}),
            "timestep": ("INT", {"default": 0, "min": 0, "max": 999, "tooltip":
                         "The (near-clean) timestep of the single reference pass. Keep the value the adapter was trained with (0)."}),
            "name": ("STRING", {"default": "identity", "tooltip": "A label for messages and saved files "
                     "(letters, digits, spaces, '_' and '-')."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "If connected, the reference pass uses CLIP's empty prompt; otherwise a zero text "
                              "context. Use what the adapter was trained with."}),
        }}

    RETURN_TYPES = ("IDFUSION_IDENTITY",)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("h_f for every cross-attention layer and reference, computed once and cached.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs each reference face once through the UNet (clean latent, fixed timestep) and records the hidden "
                   "state h_f entering every cross-attention layer. The result is cached; IDFusion Apply projects it "
                   "into K_f/V_f once.")

    def encode(self, model, vae, reference_images, timestep, name, clip=None):
        check_name("name", name, where="it labels the identity in messages and saved files")
        pbar = comfy.utils.ProgressBar(reference_images.shape[0])
        identity = glue_for(model).encode_identity(model, vae, reference_images, clip=clip, timestep=timestep, name=name, progress=pbar)
        return {"ui": thumbnails_ui(identity), "result": (identity,)}


class IDFusionMergeIdentities:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_1": ("IDFUSION_IDENTITY", {"tooltip": "References of one person."}),
            "identity_2": ("IDFUSION_IDENTITY", {"tooltip": "More references of the SAME person (e.g. a saved identity)."}),
        }}

    RETURN_TYPES = ("IDFUSION_IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    DESCRIPTION = "Joins the references of two identities of the same person (multi-reference, Eq. 6)."

    def merge(self, identity_1, identity_2):
        return (merge([identity_1, identity_2]),)  # keeps both sets of references and their thumbnails


class IDFusionSaveIdentity:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity": ("IDFUSION_IDENTITY", {"tooltip": "The identity to keep."}),
            "filename_prefix": ("STRING", {"default": "identity", "tooltip":
                                "File name prefix; files go to models/idfusion/identities only (no folders allowed)."}),
        }, "optional": {
            "store": (list(STORE), {"default": COMPACT_CHOICE, "tooltip":
                      "compact (default): the reference latents, text context and thumbnails, about 0.3 MB for a 512 px "
                      "SD1.5 reference; h_f is recomputed by one reference pass when the identity is applied, so one file "
                      "serves every checkpoint of its family. h_f: every layer's h_f as computed now (about 46 MB per 512 px "
                      "SD1.5 reference, format 1, readable by older versions of the pack)."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves an identity as .safetensors in models/idfusion/identities, so it can be reused and shared without "
                   "the reference photos. Compact files (default) keep the reference latents and recompute h_f when applied.")

    def save(self, identity, filename_prefix, store=COMPACT_CHOICE):
        if store not in STORE:
            raise ValueError(f"store is {store!r}; pick one of {list(STORE)}.")
        path = new_identity_path(filename_prefix)
        identity.save(path, with_h_f=STORE[store])
        return {"ui": {"text": [path]}}


class IDFusionLoadIdentity:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"identity_name": (identity_files(), {"tooltip": "A saved identity from models/idfusion/identities."})}}

    RETURN_TYPES = ("IDFUSION_IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a saved identity (.safetensors only, both formats). It must have been encoded with a model of the same "
                   "family; a compact file's h_f is computed by one UNet pass per reference at the Apply node.")

    def load(self, identity_name):
        identity = Identity.load(full_path("Identity", identity_name))
        return {"ui": thumbnails_ui(identity), "result": (identity,)}


NODE_CLASS_MAPPINGS = {"IDFusionEncodeReference": IDFusionEncodeReference, "IDFusionMergeIdentities": IDFusionMergeIdentities,
                       "IDFusionSaveIdentity": IDFusionSaveIdentity, "IDFusionLoadIdentity": IDFusionLoadIdentity}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionEncodeReference": "IDFusion Encode Reference Face",
                              "IDFusionMergeIdentities": "IDFusion Merge References",
                              "IDFusionSaveIdentity": "IDFusion Save Identity",
                              "IDFusionLoadIdentity": "IDFusion Load Identity"}
