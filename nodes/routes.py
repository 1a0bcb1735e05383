"""A read-only HTTP route for the web UI (js/adapter_info.js): the metadata of an adapter or identity file.

GET /idfusion/file_info?name=<list name>   (also under /api/...)
- `name` must be one of the names ComfyUI lists for the "idfusion" model folder (what the Load Adapter / Load
  Identity combos show); there is no path input, so nothing outside those folders can be opened.
- Only the safetensors header (8-byte length + JSON) is read, never the tensors.
The pack works the same without this route or the JS: it only presents what the files already say.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import folder_paths

from .common import FOLDER

MAX_HEADER = 16 * 1024 * 1024  # a real header is a few KB; refuse to read more than this from an odd file


class FileInfoError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor table + __metadata__), without touching the tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FileInfoError(422, f"'{os.path.basename(path)}' is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise FileInfoError(422, f"'{os.path.basename(path)}' declares a {n}-byte header; not a safetensors file.")
        data = f.read(n)
    try:
        header = json.loads(data)
    except ValueError:
        raise FileInfoError(422, f"'{os.path.basename(path)}' has no readable safetensors header.") from None
    if not isinstance(header, dict):
        raise FileInfoError(422, f"'{os.path.basename(path)}' has no readable safetensors header.")
    return header


def _json(meta: dict, key: str, default=None):
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        return default


def _train_state_steps(name: str, listed: set) -> dict | None:
    """Steps from models/idfusion/training/<stem>.train-state.safetensors (the node's checkpoint), if it is listed."""
    stem = os.path.splitext(os.path.basename(name))[0]
    state = f"training/{stem}.train-state.safetensors"
    if state not in listed:
        return None
    meta = read_header(folder_paths.get_full_path(FOLDER, state)).get("__metadata__") or {}
    try:
        done = int(meta["step"])
    except (KeyError, ValueError):
        return None
    total = (_json(meta, "config", {}) or {}).get("steps")
    return {"done": done, "planned": total if isinstance(total, int) else None}


def file_info(name: str) -> dict:
    """Summary of a listed adapter/identity file's metadata; FileInfoError(status, message) otherwise."""
    if not isinstance(name, str) or not name:
        raise FileInfoError(400, "Query parameter 'name' is required: a file name as listed by IDFusion Load Adapter.")
    listed = {n.replace("\\", "/") for n in folder_paths.get_filename_list(FOLDER)}
    if name.replace("\\", "/") not in listed:
        raise FileInfoError(404, f"'{name}' is not a file in the idfusion model folders; pick one from the list.")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None or not path.lower().endswith(".safetensors"):
        raise FileInfoError(404, f"'{name}' is not a .safetensors file in the idfusion model folders.")
    meta = read_header(path).get("__metadata__") or {}
    fmt = meta.get("format")
    layers = _json(meta, "layers", [])
    out = {"name": name, "format": fmt, "format_version": meta.get("format_version"),
           "layers": len(layers) if isinstance(layers, list) else None}
    if fmt == "idfusion.adapter":
        out["family"] = meta.get("base_family")
        out["reference_encoding"] = _json(meta, "reference_encoding")
        steps = meta.get("training_steps")
        out["training_steps"] = {"done": int(steps), "planned": None} if str(steps or "").isdigit() \
            else _train_state_steps(name, listed)
    elif fmt == "idfusion.identity":
        out["family"] = meta.get("family") or meta.get("base_family")
        out["reference_encoding"] = _json(meta, "encoding")
        out["identity_name"] = meta.get("name")
        refs = meta.get("references")
        out["references"] = int(refs) if str(refs or "").isdigit() else refs
        # format 1 files carry every layer's h_f; format 2 only the reference latents (idfusion/identity.py)
        out["h_f"] = "stored" if meta.get("format_version") == "1" else "recomputed when applied"
    else:
        raise FileInfoError(422, f"'{name}' is not an IDFusion adapter or identity (its metadata says format={fmt!r}).")
    return out


def register(server) -> None:
    from aiohttp import web

    @server.routes.get("/idfusion/file_info")
    async def idfusion_file_info(request):
        try:
            return web.json_response(file_info(request.rel_url.query.get("name", "")))
        except FileInfoError as e:
            return web.json_response({"error": str(e)}, status=e.status)
        except OSError as e:
            return web.json_response({"error": f"Could not read '{request.rel_url.query.get('name')}': {e.strerror}"}, status=500)


# Registered only inside a running ComfyUI (main.py imports `server` and creates PromptServer before custom nodes
# load); tests and scripts that import the pack without a server skip it.
_prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
if _prompt_server is not None:
    register(_prompt_server)
