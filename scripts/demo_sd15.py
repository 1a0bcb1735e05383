"""The SD1.5 plumbing demo (make demo-sd15): run workflows/api/idfusion_basic_api.json through a real ComfyUI server
and print the image it wrote. The main demo is scripts/demo.py (make demo), on the pack's own trained model.

    .hosts/0.3.75/venv/bin/python scripts/demo_sd15.py [--host 0.3.75|0.3.52] [--base DIR]

Needs a host made by scripts/setup_host.sh (`make setup`). Everything else lives in a demo base directory
(default .hosts/demo, git-ignored): models/checkpoints/random_sd15.safetensors (written once, ~2 GB),
input/idfusion_reference.png (the pack's cartoon reference face), output/ (the result) and
comfyui_server.log.

No model weights can be downloaded here and no trained IDFusion adapter is public, so the checkpoint has
RANDOM weights and the adapter is a fresh, untrained one: the picture is noise. The demo shows that the
whole pipeline (checkpoint -> reference encoding -> IDFusion patch -> sampling -> decode -> save) runs in
a real ComfyUI server, not that it makes a face.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import comfy_server  # noqa: E402

WORKFLOW = os.path.join(ROOT, "workflows", "api", "idfusion_basic_api.json")
REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")
CKPT_NAME = "random_sd15.safetensors"
REFERENCE_NAME = "idfusion_reference.png"
NOTICE = ("NOTE: the checkpoint has RANDOM weights (no weights can be downloaded here) and the IDFusion adapter is\n"
          "untrained (init 'random'; no public adapter exists), so the picture is noise. This demo shows that the\n"
          "pipeline runs end to end in a real ComfyUI server, not the quality of IDFusion.")


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def write_checkpoint(path: str, comfyui_dir: str, python: str):
    """Write the random SD1.5 checkpoint in a separate process of the host's Python (it needs torch and
    ComfyUI; the memory it takes is given back before the server starts). Written under a temporary name
    and renamed, so an interrupted run never leaves a truncated checkpoint behind."""
    tmp = path + ".partial"
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import comfy.cli_args; comfy.cli_args.args.cpu = True\n"
            "import random_models; random_models.write_checkpoint(sys.argv[3], seed=0)\n")
    subprocess.run([python, "-c", code, comfyui_dir, HERE, tmp], check=True)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the IDFusion demo workflow through a real ComfyUI server.")
    p.add_argument("--host", default="0.3.75", help="pinned host version under .hosts/ (default 0.3.75)")
    p.add_argument("--comfyui", default=None, help="ComfyUI directory (overrides --host)")
    p.add_argument("--python", default=None, help="Python of the host (default: its venv)")
    p.add_argument("--base", default=os.path.join(ROOT, ".hosts", "demo"), help="demo base directory")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the prompt may take")
    a = p.parse_args(argv)

    comfyui_dir = os.path.abspath(a.comfyui or os.path.join(ROOT, ".hosts", a.host, "ComfyUI"))
    if not os.path.isfile(os.path.join(comfyui_dir, "main.py")):
        print(f"demo: no ComfyUI host at {comfyui_dir}. Run `make setup` (scripts/setup_host.sh {a.host}) first.",
              file=sys.stderr)
        return 2
    python = a.python or comfy_server.default_python(comfyui_dir)
    base = os.path.abspath(a.base)
    print(NOTICE, flush=True)
    t0 = time.monotonic()
    try:
        ckpt = os.path.join(base, "models", "checkpoints", CKPT_NAME)
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        if os.path.isfile(ckpt):
            print(f"[demo] random checkpoint already present: {ckpt}", flush=True)
        else:
            print(f"[demo] writing a random-weight SD1.5 checkpoint (~2 GB, about a minute): {ckpt}", flush=True)
            write_checkpoint(ckpt, comfyui_dir, python)
        os.makedirs(os.path.join(base, "input"), exist_ok=True)
        shutil.copyfile(REFERENCE, os.path.join(base, "input", REFERENCE_NAME))

        server = comfy_server.ComfyServer(comfyui_dir, base, python=python)
        print(f"[demo] starting ComfyUI ({comfyui_dir}) with base directory {base}; log: {server.log_path}", flush=True)
        with server.start(timeout=300):
            server.check_nodes(comfy_server.pack_node_names())
            print(f"[demo] server up at {server.url}, IDFusion nodes registered; queueing {WORKFLOW}", flush=True)
            t1 = time.monotonic()
            prompt = comfy_server.load_workflow(WORKFLOW)
            prompt["1"]["inputs"]["ckpt_name"] = CKPT_NAME  # the workflow names the usual SD1.5 file
            images = server.run(prompt, timeout=a.timeout)
            print(f"[demo] prompt finished in {time.monotonic() - t1:.1f}s", flush=True)
    except comfy_server.ComfyServerError as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    if not images or not all(os.path.isfile(i) for i in images):
        print(f"demo FAILED: the prompt finished but no image file was written (got {images}).", file=sys.stderr)
        return 1
    for path in images:
        w, h = png_size(path)
        print(f"[demo] image written ({w}x{h}, random weights -> noise): {os.path.abspath(path)}")
    print(f"[demo] done in {time.monotonic() - t0:.1f}s. The pipeline ran end to end; the picture is noise because "
          f"the weights are random.")
    print(os.path.abspath(images[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
