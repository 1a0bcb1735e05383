"""Loader for the pack's own small base model (synthetic_faces), shipped in the pack's models/ folder: it returns
MODEL, CLIP and VAE like a checkpoint loader, for ComfyUI's own text, latent, sampler and VAE nodes."""
import folder_paths

from ..idfusion import synthetic
from .common import CATEGORY

FOLDER = "idfusion_synthetic"


def model_files() -> list[str]:
    # top level only: subfolders hold the adapter (models/idfusion) and the demo's classifier
    return [f for f in folder_paths.get_filename_list(FOLDER) if "/" not in f.replace("\\", "/")]


class IDFusionSyntheticModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (model_files(), {
            "tooltip": "A synthetic_faces model file (the pack ships models/synthetic_faces.safetensors; "
                       "`make synthetic` rebuilds it). Use EmptyLatentImage 128x128 for one face."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The diffusion model (a tiny UNet that predicts the clean picture).",
                       "Its word-level text encoder: prompts like 'a photo of a person, crying, facing left, teal background'.",
                       "Its codec (exact for the model's pictures): use with VAE Encode / VAE Decode.")
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/synthetic"
    DESCRIPTION = ("Loads the pack's own small cartoon-face model, trained on CPU, so identity transfer can be seen "
                   "without downloading anything. Pair it with models/idfusion/synthetic_faces_adapter.safetensors.")

    def load(self, model_name):
        path = folder_paths.get_full_path(FOLDER, model_name)
        if path is None:
            raise FileNotFoundError(f"Synthetic model '{model_name}' was not found in "
                                    f"{', '.join(folder_paths.get_folder_paths(FOLDER))}; refresh the node list.")
        patcher, clip, codec, _ = synthetic.load(path)
        return (patcher, clip, codec)


NODE_CLASS_MAPPINGS = {"IDFusionSyntheticModelLoader": IDFusionSyntheticModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionSyntheticModelLoader": "IDFusion Load Synthetic Faces Model"}
