"""The sampling settings a shipped adapter recommends, read by the pack's own reader (idfusion/adapter.py
recommended_settings), for scripts that talk to ComfyUI over HTTP and do not import the pack as a node package."""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recommended(path: str) -> dict:
    """{"cfg", "uncond", "weight", "end_at"} from the adapter file's metadata; ValueError naming the file if missing."""
    name = "idfusion_adapter_file"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "idfusion", "adapter.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module        # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)   # the module imports torch and safetensors only, no ComfyUI
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: it ships with the pack (`make synthetic` rebuilds it)")
    return module.recommended_settings(path)
