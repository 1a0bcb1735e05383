"""Loader for the pack's own small base models (synthetic_faces: a UNet and a Flux DiT), shipped in the pack's
models/ folder: it returns MODEL, CLIP and VAE like a checkpoint loader, for ComfyUI's own text, latent, sampler and
VAE nodes."""
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
            "tooltip": "A synthetic_faces model file. The pack ships two, one per model family: "
                       "synthetic_faces.safetensors (a UNet; `make synthetic` rebuilds it) and "
                       "synthetic_faces_flux.safetensors (ComfyUI's Flux DiT class at a tiny width, needs ComfyUI "
                       "0.3.75 or newer; `make synthetic-flux`). Each has its own adapter in models/idfusion/. "
                       "Use EmptyLatentImage 96x96 for one face."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The diffusion model (a tiny UNet or Flux DiT that predicts the clean picture).",
                       "Its word-level text encoder: prompts like 'a photo of a person, crying, facing left, teal background'.",
                       "Its codec (exact for the model's pictures): use with VAE Encode / VAE Decode.")
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/synthetic"
    DESCRIPTION = ("Loads one of the pack's own small cartoon-face models, trained on CPU, so identity transfer can be "
                   "seen without downloading anything: the UNet (pair it with synthetic_faces_adapter.safetensors) or "
                   "the Flux DiT (synthetic_faces_flux_adapter.safetensors).")

    def load(self, model_name):
        path = folder_paths.get_full_path(FOLDER, model_name)
        if path is None:
            raise FileNotFoundError(f"Synthetic model '{model_name}' was not found in "
                                    f"{', '.join(folder_paths.get_folder_paths(FOLDER))}; refresh the node list.")
        patcher, clip, codec, _ = synthetic.load(path)
        return (patcher, clip, codec)


NODE_CLASS_MAPPINGS = {"IDFusionSyntheticModelLoader": IDFusionSyntheticModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionSyntheticModelLoader": "IDFusion Load Synthetic Faces Model"}
