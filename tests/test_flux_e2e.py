"""Flux at real width end to end through a REAL ComfyUI server: a random Flux-dev-width DiT (hidden 3072, 24 heads,
Flux's RoPE axes, 2 double + 4 single blocks: 1.29 G parameters) in a diffusion_models file that ComfyUI's UNETLoader
detects as Flux, loaded with weight_dtype fp8_e5m2 (1.3 GB, computed in fp32 by ComfyUI's manual cast), a random
CLIP-L (CLIPLoader) and a random 16-channel VAE. The model's text input is CLIP-L's width (768 tokens, 768 pooled)
instead of T5-XXL's 4096: T5-XXL alone is 4.7 G parameters, over the machine's budget, and nothing IDFusion touches
depends on the text width (scripts/random_flux.py).

IDFusion Apply, and Apply Multi-Identity with two masks next to ComfyUI's own ReferenceLatent in the same graph,
change the image against the unpatched branch of the same prompt; the server's peak RSS (VmHWM) stays under 8 GB.
The random files are written once, one tensor at a time, into .hosts/.cache (or $IDFUSION_TEST_CACHE)."""
import hashlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import comfy_server  # scripts/ is on sys.path (conftest.py)
from conftest import COMFYUI, ROOT
from test_sdxl_e2e import REFERENCE, check_image, check_peak, run_images

pytestmark = pytest.mark.e2e
PARTS = ("unet", "clip_l", "vae")


def _cache_paths() -> dict:
    import random_flux as rf
    import random_models as rm
    src = "".join(inspect.getsource(f) for f in (rm.write_safetensors_streaming, rm._random_tensor, rf.write_flux_unet,
                                                 rf._flux_tensor, rf.flux_unet_shapes, rf.write_flux_vae, rf.write_clip_l,
                                                 rm.randomize_))
    key = json.dumps([rf.DEV_WIDTH, rf.FLUX_VAE_DDCONFIG], sort_keys=True) + src
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = os.environ.get("IDFUSION_TEST_CACHE") or os.path.join(ROOT, ".hosts", ".cache")
    os.makedirs(folder, exist_ok=True)
    return {p: os.path.join(folder, f"random_flux_{p}{'_fp8' if p == 'unet' else ''}_{h}.safetensors") for p in PARTS}


@pytest.fixture(scope="module")
def flux_files():
    """The random files (1.6 GB on disk), built in a child process so its memory never adds to this one's; a lock
    keeps two concurrent sessions from building them twice."""
    import fcntl
    paths = _cache_paths()
    with open(paths["unet"] + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(os.path.isfile(p) for p in paths.values()):
            code = ("import sys; sys.path[:0] = [{c!r}, {s!r}]; import comfy.cli_args; comfy.cli_args.args.cpu = True; "
                    "import torch, random_flux as rf; p = {p!r}; rf.write_flux_vae(p['vae'], seed=3); "
                    "rf.write_clip_l(p['clip_l'], seed=1); rf.write_flux_unet(p['unet'], seed=0, dtype=torch.float8_e5m2)"
                    ).format(c=COMFYUI, s=os.path.join(ROOT, "scripts"), p=paths)
            subprocess.run([sys.executable, "-c", code], check=True, timeout=1200)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, flux_files):
    base = tmp_path_factory.mktemp("comfy_flux")
    for part, folder in (("unet", "diffusion_models"), ("clip_l", "text_encoders"), ("vae", "vae")):
        os.makedirs(base / "models" / folder, exist_ok=True)
        os.symlink(flux_files[part], base / "models" / folder / f"random_flux_{part}.safetensors")
    os.makedirs(base / "input")
    with Image.open(REFERENCE) as im:
        im.convert("RGB").resize((64, 64), Image.BICUBIC).save(base / "input" / "reference_64.png")
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable)
    srv.launch()
    try:
        srv.wait_ready(timeout=240)
        yield srv
    finally:
        srv.stop()


def flux_graph(reference_latent: bool = False) -> dict:
    """Loaders, prompts, the reference identity and a baseline branch (the unpatched model: node 21 saves it).
    reference_latent: the positive prompt also carries the reference image through ComfyUI's ReferenceLatent."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "random_flux_unet.safetensors", "weight_dtype": "fp8_e5m2"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "random_flux_clip_l.safetensors", "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "random_flux_vae.safetensors"}},
        "4": {"class_type": "IDFusionNewAdapter", "inputs": {"model": ["1", 0], "init": "random", "seed": 0}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "reference_64.png"}},
        "6": {"class_type": "IDFusionEncodeReference", "inputs": {"model": ["1", 0], "vae": ["3", 0], "reference_images": ["5", 0],
                                                                  "timestep": 0, "name": "person one"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a person smiling", "clip": ["2", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "19": {"class_type": "KSampler", "inputs": _sampler(["1", 0])},
        "20": {"class_type": "VAEDecode", "inputs": {"samples": ["19", 0], "vae": ["3", 0]}},
        "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "flux_baseline"}},
    }
    if reference_latent:
        g["24"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["3", 0]}}
        g["25"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["24", 0]}}
        g["19"]["inputs"]["positive"] = ["25", 0]
    return g


def _sampler(model):
    # one step at cfg 2: cond and uncond go through the DiT in one batch ("text only": the uncond rows see no identity)
    return {"model": model, "seed": 1, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}


def _patched_branch(graph, model, prefix):
    graph["11"] = {"class_type": "KSampler", "inputs": dict(_sampler(model), positive=graph["19"]["inputs"]["positive"])}
    graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}}
    graph["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}}
    return graph


def test_flux_apply_changes_the_image(server):
    """IDFusion Apply on the fp8 Flux-dev-width DiT: the image differs from the unpatched branch; both are finite; the
    model really is Flux (detected from the file) at fp8."""
    prompt = _patched_branch(flux_graph(), ["10", 0], "flux_apply")
    prompt["10"] = {"class_type": "IDFusionApply", "inputs": {"model": ["1", 0], "adapter": ["4", 0], "identity": ["6", 0],
                                                              "weight": 1.0, "start_at": 0.0, "end_at": 1.0,
                                                              "uncond": "text only", "mode": "adapter default"}}
    images, _ = run_images(server, prompt)
    assert set(images) == {"13", "21"}, images.keys()
    check_image(images["13"], "the IDFusion image")
    check_image(images["21"], "the baseline image")
    diff = np.abs(images["13"] - images["21"]).mean()
    print(f"mean |apply - baseline| = {diff:.2f} (of 255)")
    assert diff > 1.0, "IDFusion Apply did not change the Flux image"
    with open(os.path.join(server.base_dir, comfy_server.LOG_NAME)) as f:
        log = f.read()
    assert "Requested to load Flux" in log and "model weight dtype torch.float8_e5m2, manual cast: torch.float32" in log
    check_peak(server, "Apply")


def test_flux_multi_identity_with_masks_and_reference_latent(server):
    """Apply Multi-Identity (the reference and its mirror image, left and right masks) with ComfyUI's ReferenceLatent
    on the positive prompt of both branches: runs, and changes the image against the unpatched ReferenceLatent branch."""
    prompt = _patched_branch(flux_graph(reference_latent=True), ["10", 0], "flux_multi")
    prompt.update({
        "14": {"class_type": "ImageFlip", "inputs": {"image": ["5", 0], "flip_method": "y-axis: horizontally"}},
        "15": {"class_type": "IDFusionEncodeReference", "inputs": {"model": ["1", 0], "vae": ["3", 0], "reference_images": ["14", 0],
                                                                   "timestep": 0, "name": "person two"}},
        "16": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "17": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "22": {"class_type": "MaskComposite", "inputs": {"destination": ["16", 0], "source": ["17", 0], "x": 0, "y": 0, "operation": "add"}},
        "23": {"class_type": "MaskComposite", "inputs": {"destination": ["16", 0], "source": ["17", 0], "x": 32, "y": 0, "operation": "add"}},
        "18": {"class_type": "IDFusionMaskBatch", "inputs": {"mask_1": ["22", 0], "mask_2": ["23", 0]}},
        "10": {"class_type": "IDFusionApplyMultiIdentity", "inputs": {
            "model": ["1", 0], "adapter": ["4", 0], "masks": ["18", 0], "identity_1": ["6", 0], "identity_2": ["15", 0],
            "weight": 1.0, "start_at": 0.0, "end_at": 1.0, "uncond": "text only", "mode": "adapter default"}},
    })
    images, _ = run_images(server, prompt)
    assert set(images) == {"13", "21"}, images.keys()
    check_image(images["13"], "the Multi-Identity image")
    diff = np.abs(images["13"] - images["21"]).mean()
    print(f"mean |multi-identity + ReferenceLatent - baseline + ReferenceLatent| = {diff:.2f} (of 255)")
    assert diff > 1.0, "IDFusion Apply Multi-Identity did not change the Flux image"
    check_peak(server, "Apply Multi-Identity + ReferenceLatent")
