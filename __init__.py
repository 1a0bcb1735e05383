"""ComfyUI-IDFusion: identity-preserving generation by fusing a reference face's UNet hidden states into
cross-attention ("Fusion is all you need", Mohamed, Han, Li)."""
import os

import folder_paths

# models/idfusion holds adapters; models/idfusion/identities holds saved identities. Entries for
# "idfusion" in extra_model_paths.yaml are added by ComfyUI before custom nodes load and are kept.
folder_paths.add_model_folder_path("idfusion", os.path.join(folder_paths.models_dir, "idfusion"))
if "idfusion" in folder_paths.folder_names_and_paths:
    paths, exts = folder_paths.folder_names_and_paths["idfusion"]
    folder_paths.folder_names_and_paths["idfusion"] = (paths, set(exts) | {".safetensors"})

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
