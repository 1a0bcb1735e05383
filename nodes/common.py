"""Small helpers shared by the node families: model-folder file lists and safe output paths."""
from __future__ import annotations

import os
import re

import folder_paths

FOLDER = "idfusion"
IDENTITY_SUBFOLDER = "identities"
CATEGORY = "IDFusion"


def adapter_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if not f.replace("\\", "/").startswith(IDENTITY_SUBFOLDER + "/")]


def identity_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.replace("\\", "/").startswith(IDENTITY_SUBFOLDER + "/")]


def full_path(kind: str, name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise FileNotFoundError(f"{kind} '{name}' was not found in the idfusion model folders ({folders}). "
                                f"Put the file there and refresh the node list.")
    return path


_SAFE = re.compile(r"^[A-Za-z0-9 _\-]+$")


def new_identity_path(prefix: str) -> str:
    """models/idfusion/identities/<prefix>_00001.safetensors, never outside that folder."""
    if not _SAFE.match(prefix or ""):
        raise ValueError(f"filename_prefix {prefix!r} may only contain letters, digits, spaces, '_' and '-' "
                         f"(no folders): identities are always saved in models/idfusion/{IDENTITY_SUBFOLDER}.")
    folder = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], IDENTITY_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    existing = set(os.listdir(folder))
    n = 1
    while f"{prefix}_{n:05}.safetensors" in existing:
        n += 1
    return os.path.join(folder, f"{prefix}_{n:05}.safetensors")
