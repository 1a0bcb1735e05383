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


# ---- number and choice inputs, checked against the node's own INPUT_TYPES --------------------------------------
def _spec(node_cls, name):
    types = node_cls.INPUT_TYPES()
    for part in ("required", "optional"):
        if name in types.get(part, {}):
            return types[part][name]
    return None


def check_inputs(node_cls, aliases: dict | None = None, **values):
    """True, or a message naming the first bad input: a FLOAT/INT that is not a finite number inside the node's own
    min/max (JSON NaN passes ComfyUI's min/max check, since every comparison with NaN is false), or a choice outside
    the node's list (plus `aliases`: name -> other accepted values). None means 'not given' (a linked input at
    validation time) and is skipped. Used by VALIDATE_INPUTS (the prompt is refused before it runs) and again when the
    node runs (linked values and Python callers)."""
    import math
    for name, value in values.items():
        if value is None:
            continue
        spec = _spec(node_cls, name)
        if spec is None:
            continue
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            allowed = list(kind) + list((aliases or {}).get(name, ()))
            if value not in allowed:
                return f"{name} is {str(value)[:60]!r}; choose one of {kind}."
            continue
        if kind not in ("FLOAT", "INT"):
            continue
        lo, hi = opts.get("min"), opts.get("max")
        span = f" from {lo} to {hi}" if lo is not None and hi is not None else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} is {str(value)[:60]}, not a finite number: give a number{span}."
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name} is {value:g}, outside its range: give a number{span}."
    return True


def require_inputs(node_cls, aliases: dict | None = None, **values):
    """check_inputs, raising ValueError (the node's error in ComfyUI) instead of returning the message."""
    ok = check_inputs(node_cls, aliases, **values)
    if ok is not True:
        raise ValueError(ok)
