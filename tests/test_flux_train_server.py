"""IDFusion Train Adapter on a Flux DiT inside a REAL ComfyUI server (main.py --cpu), queued over HTTP. ComfyUI
loads the model and runs the node under torch.inference_mode(). The model is a random Flux file that UNETLoader
detects as Flux; ComfyUI's detection fixes the width of a Flux to Flux dev's (hidden 3072, 24 heads), so it has one
double block only (0.4 G parameters; single blocks train in test_flux_train.py), and text 64 wide to take the pack's
synthetic_faces word encoder as its CLIP (CLIP-L would cost more than the DiT). A random 16-channel VAE file
(VAELoader). In the same prompt the trained adapter is Applied on the same model through a sampler: the image differs
from the plain model's. (Loading the saved file with Load Adapter is tested in test_flux_train.py: a second prompt
here would cost a second load of the model on the test machine.)"""
import os
import sys

import numpy as np
import pytest
from PIL import Image

import comfy_server  # scripts/ is on sys.path (conftest.py)
import random_flux
from conftest import COMFYUI, ROOT
from idfusion_pack.idfusion import patch_flux
from test_train_server import synthetic_dataset

SYNTHETIC = os.path.join(ROOT, "models", "synthetic_faces.safetensors")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(patch_flux.missing_hooks() is not None, reason="needs the attention override hooks"),
              pytest.mark.skipif(not os.path.isfile(SYNTHETIC), reason="needs the pack's synthetic_faces model (its CLIP)")]


def flux_config():
    """The smallest Flux ComfyUI detects: Flux dev's width, one double block, text as wide as the word encoder's."""
    from safetensors import safe_open
    with safe_open(SYNTHETIC, "pt") as f:
        width = f.get_slice("text.emb.weight").get_shape()[1]
    return dict(random_flux.DEV_WIDTH, context_in_dim=width, vec_in_dim=32, depth=1, depth_single_blocks=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("flux_train_base")
    for d in ("diffusion_models", "vae"):
        os.makedirs(base / "models" / d)
    random_flux.write_flux_unet(str(base / "models" / "diffusion_models" / "tiny_flux.safetensors"), seed=1, cfg=flux_config())
    random_flux.write_flux_vae(str(base / "models" / "vae" / "flux_vae.safetensors"), seed=2)
    faces = base / "input" / "idfusion_datasets" / "faces"
    faces.mkdir(parents=True)
    synthetic_dataset(faces)
    with comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable) as srv:
        yield srv


def loaders():
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "IDFusionSyntheticModelLoader", "inputs": {"model_name": "synthetic_faces.safetensors"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_vae.safetensors"}}}


def train_prompt(name, steps):
    return {**loaders(), "4": {"class_type": "IDFusionTrainAdapter", "inputs": {
        "model": ["1", 0], "clip": ["2", 1], "vae": ["3", 0], "dataset": "faces", "adapter_name": name,
        "steps": steps, "batch_size": 1, "learning_rate": 1e-3, "resolution": 64, "save_every": 1, "seed": 0,
        "init": "random", "reference": "other image", "reference_dropout": 0.0, "face_loss_weight": 0.0,
        "cgdr_weight": 0.0, "class_prompt": "a photo of a person", "encoding": "cached", "resume": True}}}


def train_and_apply_prompt(name, steps):
    """Train, then the trained adapter on the same model: Encode Reference, Apply, one sampler step next to the plain
    model's, both decoded and saved."""
    p = train_prompt(name, steps)
    p.update({
        "6": {"class_type": "IDFusionExampleReference", "inputs": {"image": "reference_face.png"}},
        "7": {"class_type": "IDFusionEncodeReference", "inputs": {"model": ["1", 0], "vae": ["3", 0],
              "reference_images": ["6", 0], "timestep": 0, "name": "reference"}},
        "8": {"class_type": "IDFusionApply", "inputs": {"model": ["1", 0], "adapter": ["4", 0], "identity": ["7", 0],
              "weight": 1.0, "start_at": 0.0, "end_at": 1.0, "uncond": "text only", "mode": "adapter default",
              "reference_tokens": "all", "block_weights": ""}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of a person"}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    })
    for tag, model, first in (("idfusion", ["8", 0], 11), ("plain", ["1", 0], 14)):
        p[str(first)] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["9", 0], "negative": ["9", 0], "latent_image": ["10", 0], "seed": 3,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        p[str(first + 1)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(first), 0], "vae": ["3", 0]}}
        p[str(first + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(first + 1), 0],
                                                                   "filename_prefix": f"flux_{tag}"}}
    return p


def test_train_node_trains_a_flux_adapter_in_a_server_and_the_adapter_applies(server):
    prompt_id = server.queue(train_and_apply_prompt("flux_served", 1))
    entry = server.wait(prompt_id, timeout=900)
    root = os.path.join(server.dir("models"), "idfusion")
    assert sorted(os.listdir(root)) == ["flux_served.safetensors", "training"]
    history = entry["outputs"]["4"]["idfusion_loss"]
    assert [s for s, _ in history] == [1] and all(np.isfinite(l) for _, l in history), history
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    adapter = IDFusionAdapter.load(os.path.join(root, "flux_served.safetensors"))
    assert adapter.family == "Flux" and [l.key for l in adapter.layers] == [("double", 0, 0)]
    assert adapter.layers[0].channels == 3072 and adapter.layers[0].heads == 24

    images = server.output_images(entry)
    pictures = {tag: np.asarray(Image.open(next(p for p in images if os.path.basename(p).startswith(f"flux_{tag}"))),
                                dtype=np.float64) for tag in ("idfusion", "plain")}
    diff = np.abs(pictures["idfusion"] - pictures["plain"]).mean()
    print(f"mean |IDFusion - plain| = {diff:.2f} of 255")
    assert np.isfinite(diff) and diff > 0.5, diff
