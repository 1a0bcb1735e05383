"""The API-format workflow: nodes addressed as TITLE.INPUT, table values as the type each input takes, --set."""
from __future__ import annotations

import copy
import hashlib
import json
import math

import comfy_server
from comfy_server import ComfyServerError

from .common import BatchError

UPLOAD_CLASSES = {("LoadImage", "image"), ("LoadImageMask", "image"), ("IDFusionExampleReference", "image")}  # when /object_info does not say image_upload


def load_api_workflow(path: str) -> dict:
    """The API-format workflow; a UI-format file (the editor's Save) is refused with how to export the right one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise BatchError(f"Cannot read workflow {path}: {e.strerror}.") from None
    except ValueError as e:
        raise BatchError(f"Workflow {path} is not JSON ({e}).") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise BatchError(f"{path} is a UI-format workflow (what the editor's Save writes: nodes, links, widget values). "
                         f"The batch runner needs the API format: in ComfyUI use Workflow > Export (API) (older "
                         f"menus: Save (API), with the dev mode setting on) and pass that file.")
    try:
        return comfy_server.load_workflow(path)
    except ComfyServerError as e:
        raise BatchError(str(e)) from None


def input_spec(info: dict | None, class_type: str, name: str):
    """The input's spec from /object_info ([type or combo list, options]), or None if unknown."""
    node = (info or {}).get(class_type) or {}
    for group in ("required", "optional"):
        spec = (node.get("input") or {}).get(group, {}).get(name)
        if spec is not None:
            return spec
    return None


def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_upload_input(info: dict | None, class_type: str, name: str) -> bool:
    return bool(_options(input_spec(info, class_type, name)).get("image_upload")) or (class_type, name) in UPLOAD_CLASSES


def combo_choices(spec) -> list | None:
    """A combo input's choices (LoadImage: the files in the server's input folder), in either spec form: [[a, b], {..}]
    or ["COMBO", {"options": [a, b]}]; None if the input is not a combo or the spec is unknown."""
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], list):
        return spec[0]
    options = _options(spec).get("options")
    return options if isinstance(options, list) else None


def resolve(workflow: dict, info: dict | None, address: str, where: str) -> list[tuple[str, str]]:
    """TITLE.INPUT -> [(node id, input name), ...]; raises naming the address and what exists."""
    title, dot, name = address.strip().rpartition(".")
    if not dot or not title.strip() or not name:
        raise BatchError(f"{where}: '{address}' is not TITLE.INPUT (a node's title, a dot, one of its inputs), "
                         f"e.g. 'KSampler.seed' or 'prompt.text'.")
    key = title.strip().lower()
    nodes = [nid for nid, n in workflow.items() if str((n.get("_meta") or {}).get("title", "")).strip().lower() == key]
    if not nodes and title.strip() in workflow:
        nodes = [title.strip()]
    if not nodes:
        nodes = [nid for nid, n in workflow.items() if n["class_type"].lower() == key]
    if not nodes:
        titles = sorted({str((n.get("_meta") or {}).get("title", "")) for n in workflow.values()} - {""})
        raise BatchError(f"{where}: no node of the workflow is titled '{title}' (nor has that id or class type). "
                         f"Titles: {', '.join(repr(t) for t in titles)}. Set a title in ComfyUI (right-click the node "
                         f"> Title) and export with Save (API).")
    out = []
    for nid in sorted(nodes, key=lambda k: (len(k), k)):
        node, n = workflow[nid], name
        if n == "seed" and n not in node["inputs"] and "noise_seed" in node["inputs"]:
            n = "noise_seed"  # KSamplerAdvanced and friends
        if n not in node["inputs"] and input_spec(info, node["class_type"], n) is None:
            known = sorted(set(node["inputs"]) | {k for g in ("required", "optional") for k in
                                                   (((info or {}).get(node["class_type"]) or {}).get("input") or {}).get(g, {})})
            raise BatchError(f"{where}: node {nid} ({node['class_type']}) has no input '{name}'. "
                             f"Its inputs: {', '.join(known)}.")
        out.append((nid, n))
    return out


def check_value(value, where: str):
    """A job's value is text, a finite number or true/false: a list would be read by ComfyUI as a link to another
    node, and NaN or infinity reaches the node (JSON NaN passes ComfyUI's min/max checks) or breaks the manifest."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BatchError(f"{where}: {value} is not a finite number; write a number (e.g. 0.8).")
    if not isinstance(value, (str, int, float, bool)):
        raise BatchError(f"{where}: {json.dumps(value)[:60]} is a {type(value).__name__}; a value must be text, a "
                         f"number or true/false.")
    return value


def coerce(value, spec, where: str):
    """A table cell (text in CSV) as the type the input takes (INT, FLOAT, BOOLEAN; everything else as text)."""
    check_value(value, where)
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if not isinstance(value, str) or not isinstance(kind, str):
        return value
    text = value.strip()
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return check_value(float(text), where)
    except ValueError:
        raise BatchError(f"{where}: '{value[:60]}' is not {'an integer' if kind == 'INT' else 'a number'} "
                         f"(the input is {kind}).") from None
    if kind == "BOOLEAN":
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise BatchError(f"{where}: '{value[:60]}' is not true or false (the input is BOOLEAN).")
    return value


def apply_sets(workflow, info, sets) -> dict:
    """--set TITLE.INPUT=VALUE for every job."""
    wf = copy.deepcopy(workflow)
    for item in sets or []:
        address, eq, value = item.partition("=")
        if not eq:
            raise BatchError(f"--set {item}: write TITLE.INPUT=VALUE, e.g. --set KSampler.steps=8.")
        for nid, name in resolve(wf, info, address, f"--set {item}"):
            wf[nid]["inputs"][name] = coerce(value, input_spec(info, wf[nid]["class_type"], name), f"--set {item}")
    return wf


def workflow_hash(workflow: dict) -> str:
    return hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()[:12]
