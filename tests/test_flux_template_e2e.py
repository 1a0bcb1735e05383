"""Template 8 (Flux - one identity: a user's Flux dev/schnell) end to end through a REAL ComfyUI server, its API twin
(workflows/api/idfusion_flux_one_identity_api.json, the graph the UI template gives: test_browser_workflows.py) on
random files put under the names the template ships with, in the folders its Notes name:
- diffusion_models/flux1-dev.safetensors: test_flux_e2e.py's random Flux-dev-width DiT (hidden 3072, 24 heads, 2
  double + 4 single blocks), which UNETLoader detects as Flux;
- vae/ae.safetensors: a random 16-channel VAE;
- idfusion/idfusion_flux_adapter.safetensors: a random adapter shaped for that DiT's blocks, loaded by the template's
  IDFusion Load Adapter.
What is changed, and why: the template's text encoder, DualCLIPLoader with clip_l + t5xxl (type flux), cannot be faked
here (a random T5-XXL is 4.7 G parameters, over this machine's budget), so that node is swapped for CLIPLoader on a
random CLIP-L (text_encoders/clip_l.safetensors, type stable_diffusion), as test_flux_e2e.py does: the random DiT
takes CLIP-L's text width. weight_dtype is fp8_e5m2 (the random file is fp8; "default" would make 5 GB of fp32 weights
on the CPU), the latent 64x64 and 1 step. Every other node and link runs as the template has it (Load Adapter, Encode
Reference, Apply, FluxGuidance, ConditioningZeroOut, KSampler, VAEDecode, SaveImage), next to the same sampler on the
unpatched model: the identity changes the picture. A missing file is refused in the UI by test_browser_workflows.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import build_ui_workflows as build  # scripts/ is on sys.path (conftest.py)
import comfy_server
import random_flux
from conftest import COMFYUI, ROOT
from idfusion_pack.idfusion import patch_flux
from idfusion_pack.idfusion.adapter import IDFusionAdapter
from test_flux_e2e import flux_files  # noqa: F401  (the cached random files, a fixture)
from test_sdxl_e2e import check_image, check_peak, run_images

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(patch_flux.missing_hooks() is not None, reason="needs the attention override hooks")]
TWIN = os.path.join(ROOT, "workflows", "api", build.SPECS["8 Flux - one identity"]["twin"])


def adapter_for(cfg: dict, path: str):
    """A random adapter for the blocks of a Flux with this config (built on the meta device: no weights)."""
    import comfy.ldm.flux.model
    import comfy.ops
    kw = {k: v for k, v in cfg.items() if k != "image_model"}
    with torch.device("meta"):
        dm = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **kw)
    layers = patch_flux.find_layers(dm)
    torch.manual_seed(0)
    adapter = IDFusionAdapter(layers, "Flux")
    for p in adapter.parameters():
        p.data.mul_(4.0)  # PyTorch's default init is small against 3072 channels: make the identity's effect plain
    adapter.save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, flux_files):  # noqa: F811
    base = tmp_path_factory.mktemp("comfy_flux_template")
    for part, folder, name in (("unet", "diffusion_models", build.FLUX_UNET), ("clip_l", "text_encoders", build.FLUX_CLIP_L),
                               ("vae", "vae", build.FLUX_VAE)):
        os.makedirs(base / "models" / folder, exist_ok=True)
        os.symlink(flux_files[part], base / "models" / folder / name)
    os.makedirs(base / "models" / "idfusion")
    adapter_for(random_flux.DEV_WIDTH, str(base / "models" / "idfusion" / build.FLUX_ADAPTER))
    with comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable) as srv:
        yield srv


def test_flux_template_runs_end_to_end_on_files_under_its_names(server):
    with open(TWIN) as f:
        prompt = json.load(f)
    assert prompt["2"]["class_type"] == "DualCLIPLoader" and prompt["2"]["inputs"]["type"] == "flux"
    assert prompt["2"]["inputs"]["clip_name1"] == build.FLUX_CLIP_L
    prompt["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": build.FLUX_CLIP_L, "type": "stable_diffusion"}}
    prompt["1"]["inputs"]["weight_dtype"] = "fp8_e5m2"
    prompt["11"]["inputs"].update(width=64, height=64)
    prompt["12"]["inputs"]["steps"] = 1
    # the same sampler on the unpatched model, beside the template's
    prompt["20"] = {"class_type": "KSampler", "inputs": dict(prompt["12"]["inputs"], model=["1", 0])}
    prompt["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["3", 0]}}
    prompt["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "flux_template_plain"}}
    images, _ = run_images(server, prompt)
    assert set(images) == {"14", "22"}, images.keys()
    check_image(images["14"], "the template's picture")
    check_image(images["22"], "the unpatched picture")
    diff = np.abs(images["14"] - images["22"]).mean()
    print(f"mean |template - unpatched| = {diff:.2f} (of 255)")
    assert diff > 1.0, "the template's IDFusion Apply did not change the Flux picture"
    with open(os.path.join(server.base_dir, comfy_server.LOG_NAME)) as f:
        log = f.read()
    assert "Requested to load Flux" in log, "the template's diffusion model was not loaded as Flux"
    check_peak(server, "the Flux template")
