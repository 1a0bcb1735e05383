"""Small helpers shared by the node families: model-folder file lists and safe output paths."""
from __future__ import annotations

import os
import re

import folder_paths

FOLDER = "idfusion"
IDENTITY_SUBFOLDER = "identities"
TRAINING_SUBFOLDER = "training"
CATEGORY = "IDFusion"


def adapter_files() -> list[str]:
    # identities/ holds saved identities and training/ the Train node's resumable state: neither is an adapter
    return [f for f in folder_paths.get_filename_list(FOLDER)
            if not f.replace("\\", "/").startswith((IDENTITY_SUBFOLDER + "/", TRAINING_SUBFOLDER + "/"))]


def identity_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.replace("\\", "/").startswith(IDENTITY_SUBFOLDER + "/")]


def full_path(kind: str, name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise FileNotFoundError(f"{kind} '{name}' was not found in the idfusion model folders ({folders}). "
                                f"Put the file there and refresh the node list.")
    return path


# fullmatch, not match with "$": "$" also matches before a trailing newline, which let "ok\n" through
_SAFE = re.compile(r"[A-Za-z0-9 _\-]+")
_FOLDER_NAME = re.compile(r"[^\x00-\x1f\x7f/\\:]+")  # an existing folder's name: anything but separators and controls
MAX_NAME = 100  # well under every file system's 255-byte limit, with room for "_00001.train-state.safetensors"


def check_name(what: str, value, spaces: bool = True, where: str = "", folder: bool = False) -> str:
    """Refuse a name input that could leave its folder or put odd characters in a file name. folder=True: the name of
    an existing folder (a dataset), so any printable character but separators is fine."""
    hint = f" ({where})" if where else ""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is empty: give it a name{hint}.")
    if len(value) > MAX_NAME:
        raise ValueError(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}: use a shorter name{hint}.")
    if folder:
        if not _FOLDER_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{what} {value!r} must be a single folder name, without '/', '\\', ':' or control "
                             f"characters{hint}.")
        return value
    if not _SAFE.fullmatch(value) or (not spaces and " " in value) or value != value.strip():
        allowed = "letters, digits, spaces, '_' and '-'" if spaces else "letters, digits, '_' and '-'"
        raise ValueError(f"{what} {value!r} may only contain {allowed} (no folders, dots, leading or trailing spaces, "
                         f"or control characters such as a newline){hint}.")
    return value


def new_identity_path(prefix: str) -> str:
    """models/idfusion/identities/<prefix>_00001.safetensors, never outside that folder."""
    check_name("filename_prefix", prefix, where=f"identities are always saved in models/idfusion/{IDENTITY_SUBFOLDER}")
    folder = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], IDENTITY_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    existing = set(os.listdir(folder))
    n = 1
    while f"{prefix}_{n:05}.safetensors" in existing:
        n += 1
    return os.path.join(folder, f"{prefix}_{n:05}.safetensors")
