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

# The pack's own small model (models/synthetic_faces.safetensors) and its adapter (models/idfusion/), appended after
# the user's folders so saved files still go to ComfyUI/models/idfusion.
_PACK_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
folder_paths.add_model_folder_path("idfusion", os.path.join(_PACK_MODELS, "idfusion"))
folder_paths.add_model_folder_path("idfusion_synthetic", os.path.join(folder_paths.models_dir, "idfusion_synthetic"))
folder_paths.add_model_folder_path("idfusion_synthetic", _PACK_MODELS)
folder_paths.folder_names_and_paths["idfusion_synthetic"] = (folder_paths.get_folder_paths("idfusion_synthetic"), {".safetensors"})

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .nodes import routes  # noqa: E402,F401  (read-only GET /idfusion/file_info for the web UI; no-op without a server)

# the web UI extension (charts, badges, panels); the nodes work the same without it
WEB_DIRECTORY = "./js"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
