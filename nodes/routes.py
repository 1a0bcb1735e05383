"""A read-only HTTP route for the web UI (js/adapter_info.js): the metadata of an adapter or identity file.

GET /idfusion/file_info?name=<list name>   (also under /api/...)
- `name` must be one of the names ComfyUI lists for the "idfusion" model folder (what the Load Adapter / Load
  Identity combos show); there is no path input, so nothing outside those folders can be opened.
- Only the safetensors header (8-byte length + JSON) is read, never the tensors.
- Every answer is JSON. A file whose header or metadata is odd (nested too deep, the wrong JSON types, digits that
  are not ASCII) gets a 422 naming the file; the summary only holds plain, short, finite values.
The pack works the same without this route or the JS: it only presents what the files already say.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import sys

import folder_paths

from .common import FOLDER

log = logging.getLogger("IDFusion")
MAX_HEADER = 16 * 1024 * 1024  # a real header is a few KB; refuse to read more than this from an odd file
MAX_FIELD = 1 << 20            # one metadata entry parsed as JSON (SDXL's 70-layer list is ~6 KB)
MAX_TEXT = 200                 # longest text the summary passes on (names, families)
_COUNT = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() is true for '²', which int() refuses


class FileInfoError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_header(path: str, name: str | None = None) -> dict:
    """The JSON header of a safetensors file (tensor table + __metadata__), without touching the tensor data."""
    name = name or os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FileInfoError(422, f"'{name}' is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise FileInfoError(422, f"'{name}' declares a {n}-byte header; not a safetensors file.")
        data = f.read(n)
    try:
        header = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise FileInfoError(422, f"'{name}' has no readable safetensors header (not JSON, or nested too deep).") from None
    if not isinstance(header, dict):
        raise FileInfoError(422, f"'{name}' has no readable safetensors header.")
    return header


def metadata(header: dict, name: str) -> dict:
    """__metadata__ as safetensors defines it: a JSON object of strings (missing: empty)."""
    meta = header.get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FileInfoError(422, f"'{name}' has a damaged safetensors header: its __metadata__ must be a JSON object of "
                                 f"strings. Replace the file with one written by IDFusion.")
    return meta


def _json(meta: dict, key: str, default=None, name: str | None = None):
    """A metadata entry parsed as JSON; default when it is missing. When it is there but unreadable (too long, not
    JSON, nested too deep): FileInfoError naming the file and the entry, or default when name is None (lenient)."""
    text = meta.get(key)
    if text is None:
        return default
    problem = None
    if not isinstance(text, str) or len(text) > MAX_FIELD:
        problem = f"longer than {MAX_FIELD} characters"
    else:
        try:
            return json.loads(text)
        except RecursionError:  # json.loads recurses once per level: '[[[[...' 100000 deep
            problem = "nested too deep"
        except ValueError:
            problem = "not valid JSON"
    if name is None:
        return default
    raise FileInfoError(422, f"'{name}' has damaged metadata: its '{key}' entry is {problem}. The loader nodes will refuse "
                             f"it too; replace the file with one written by IDFusion.")


def _count(text):
    return int(text) if isinstance(text, str) and _COUNT.fullmatch(text) else None


def _text(value):
    """A short printable string for the page, or None."""
    if not isinstance(value, str):
        return None
    value = "".join(c for c in value[:MAX_TEXT] if c.isprintable())
    return value or None


def _encoding(value):
    """How references were encoded, as the page shows it: only the known keys, with plain finite values."""
    if not isinstance(value, dict):
        return None
    out = {}
    for k in ("mode", "timestep", "text"):
        v = value.get(k)
        if isinstance(v, str):
            out[k] = _text(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e9:
            out[k] = v
    return out


def _train_state_steps(name: str, listed: set) -> dict | None:
    """Steps from models/idfusion/training/<stem>.train-state.safetensors (the node's checkpoint), if it is listed."""
    stem = os.path.splitext(os.path.basename(name))[0]
    state = f"training/{stem}.train-state.safetensors"
    if state not in listed:
        return None
    try:  # the adapter's own summary stands even when its training state is damaged: steps are then unknown
        meta = metadata(read_header(folder_paths.get_full_path(FOLDER, state), state), state)
    except (FileInfoError, OSError):
        return None
    done = _count(meta.get("step"))
    if done is None:
        return None
    config = _json(meta, "config", {})
    total = config.get("steps") if isinstance(config, dict) else None
    return {"done": done, "planned": total if isinstance(total, int) and not isinstance(total, bool)
            and 0 <= total < 10**9 else None}


def summarize(meta: dict, name: str, listed: set = frozenset()) -> dict:
    """The page's summary of one file's metadata; FileInfoError when it is not an IDFusion adapter or identity."""
    fmt = meta.get("format")
    if fmt not in ("idfusion.adapter", "idfusion.identity"):
        shown = _text(fmt) if fmt is None or isinstance(fmt, str) else type(fmt).__name__
        raise FileInfoError(422, f"'{name}' is not an IDFusion adapter or identity (its metadata says format={shown!r}).")
    layers = _json(meta, "layers", None, name)
    out = {"name": name, "format": _text(fmt), "format_version": _text(meta.get("format_version")),
           "layers": len(layers) if isinstance(layers, list) else None}
    if fmt == "idfusion.adapter":
        out["family"] = _text(meta.get("base_family"))
        out["reference_encoding"] = _encoding(_json(meta, "reference_encoding", None, name))
        steps = _count(meta.get("training_steps"))
        out["training_steps"] = {"done": steps, "planned": None} if steps is not None else _train_state_steps(name, listed)
    elif fmt == "idfusion.identity":
        out["family"] = _text(meta.get("family") or meta.get("base_family"))
        out["reference_encoding"] = _encoding(_json(meta, "encoding", None, name))
        out["identity_name"] = _text(meta.get("name"))
        refs = meta.get("references")
        out["references"] = _count(refs) if _count(refs) is not None else _text(refs)
        # format 1 files carry every layer's h_f; format 2 only the reference latents (idfusion/identity.py)
        out["h_f"] = "stored" if meta.get("format_version") == "1" else "recomputed when applied"
    return out


def file_info(name: str) -> dict:
    """Summary of a listed adapter/identity file's metadata; FileInfoError(status, message) otherwise."""
    if not isinstance(name, str) or not name:
        raise FileInfoError(400, "Query parameter 'name' is required: a file name as listed by IDFusion Load Adapter.")
    listed = {n.replace("\\", "/") for n in folder_paths.get_filename_list(FOLDER)}
    if name.replace("\\", "/") not in listed:
        raise FileInfoError(404, f"'{_text(name)}' is not a file in the idfusion model folders; pick one from the list.")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None or not path.lower().endswith(".safetensors"):
        raise FileInfoError(404, f"'{name}' is not a .safetensors file in the idfusion model folders.")
    return summarize(metadata(read_header(path, name), name), name, listed)


def register(server) -> None:
    from aiohttp import web

    @server.routes.get("/idfusion/file_info")
    async def idfusion_file_info(request):
        name = request.rel_url.query.get("name", "")
        try:
            return web.json_response(file_info(name))
        except FileInfoError as e:
            return web.json_response({"error": str(e)}, status=e.status)
        except OSError as e:
            return web.json_response({"error": f"Could not read '{_text(name)}': {e.strerror}"}, status=500)
        except Exception as e:  # a bug here must still answer JSON naming the file, never aiohttp's plain-text 500
            log.exception("IDFusion: /idfusion/file_info failed for %r", name)
            return web.json_response({"error": f"Could not summarise '{_text(name)}': {type(e).__name__}. The file's "
                                               f"metadata is unusual; the loader nodes check it fully."}, status=500)


# Registered only inside a running ComfyUI (main.py imports `server` and creates PromptServer before custom nodes
# load); tests and scripts that import the pack without a server skip it.
_prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
if _prompt_server is not None:
    register(_prompt_server)
