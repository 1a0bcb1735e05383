"""SDXL end to end through a REAL ComfyUI server: a random full-width SDXL (UNet 2.57 G parameters, CLIP-L, CLIP-G,
VAE) loaded the way users run SDXL on small machines - UNETLoader with weight_dtype fp8_e5m2 (2.6 GB, computed in
fp32 by ComfyUI's manual cast), DualCLIPLoader type sdxl with the server's --fp8_e5m2-text-enc, VAELoader - then
IDFusion Apply and Apply Multi-Identity (two identities, two masks) over HTTP, at a 64x64 px image (8x8 latent) and
one sampling step.

Memory: a single SDXL checkpoint would load as a 10 GB fp32 UNet on the CPU. Loading the fp8 UNet briefly holds its
file's tensors and the model (2 x 2.6 GB) while the text encoders are resident, so those are kept in fp8 too (0.8 GB
instead of 1.6 GB in fp16): the server's peak is then about 6.8 GiB, and each test checks it (VmHWM of the server
process) against the suite's 8 GB limit. The random files are written once, one tensor at a time, into
.hosts/.cache (or $IDFUSION_TEST_CACHE) and shared by later sessions and both hosts."""
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

pytestmark = pytest.mark.e2e

REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")
PEAK_LIMIT = 8e9  # bytes: the suite's limit for its largest process
PARTS = ("unet", "clip_l", "clip_g", "vae")


def _cache_paths() -> dict:
    """Keyed by everything that decides the files' bytes, so an edit to the writers makes new ones."""
    import random_models as rm
    src = "".join(inspect.getsource(f) for f in (rm.write_safetensors_streaming, rm._random_tensor, rm.write_sdxl_unet,
                                                 rm.sdxl_text_encoder_shapes, rm.write_sdxl_text_encoders, rm.write_vae,
                                                 rm.randomize_))
    key = json.dumps([rm.UNET_CONFIGS["SDXL"], rm.VAE_DDCONFIG], sort_keys=True) + src
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = os.environ.get("IDFUSION_TEST_CACHE") or os.path.join(ROOT, ".hosts", ".cache")
    os.makedirs(folder, exist_ok=True)
    return {p: os.path.join(folder, f"random_sdxl_{p}{'_fp8' if p == 'unet' else ''}_{h}.safetensors") for p in PARTS}


@pytest.fixture(scope="module")
def sdxl_files():
    """The four random SDXL files (4.4 GB on disk), built in a child process (about 30 s, under 1.1 GB) so its memory
    never adds to this one's; a lock keeps two concurrent sessions from building them twice."""
    import fcntl
    paths = _cache_paths()
    with open(paths["unet"] + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(os.path.isfile(p) for p in paths.values()):
            code = ("import sys; sys.path[:0] = [{c!r}, {s!r}]; import comfy.cli_args; comfy.cli_args.args.cpu = True; "
                    "import random_models as rm; p = {p!r}; rm.write_vae(p['vae'], seed=3); "
                    "rm.write_sdxl_text_encoders(p['clip_l'], p['clip_g'], seed=1); rm.write_sdxl_unet(p['unet'], seed=0)"
                    ).format(c=COMFYUI, s=os.path.join(ROOT, "scripts"), p=paths)
            subprocess.run([sys.executable, "-c", code], check=True, timeout=1200)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, sdxl_files):
    base = tmp_path_factory.mktemp("comfy_sdxl")
    for part, folder in (("unet", "diffusion_models"), ("clip_l", "text_encoders"), ("clip_g", "text_encoders"),
                         ("vae", "vae")):
        os.makedirs(base / "models" / folder, exist_ok=True)
        os.symlink(sdxl_files[part], base / "models" / folder / f"random_sdxl_{part}.safetensors")
    os.makedirs(base / "input")
    with Image.open(REFERENCE) as im:  # a small reference: its pass through the UNet is one 8x8-latent forward
        im.convert("RGB").resize((64, 64), Image.BICUBIC).save(base / "input" / "reference_64.png")
    # as conftest.running_server, plus the low-memory text encoder option ComfyUI offers (both pinned hosts)
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable, extra_args=["--fp8_e5m2-text-enc"])
    srv.launch()
    try:
        srv.wait_ready(timeout=240)
        yield srv
    finally:
        srv.stop()


def peak_rss(srv) -> int:
    """The server process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{srv.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def sdxl_graph() -> dict:
    """Loaders, prompts, the reference identity and a baseline branch (the unpatched model: node 21 saves it)."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "random_sdxl_unet.safetensors", "weight_dtype": "fp8_e5m2"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "random_sdxl_clip_l.safetensors",
                                                         "clip_name2": "random_sdxl_clip_g.safetensors", "type": "sdxl"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "random_sdxl_vae.safetensors"}},
        "4": {"class_type": "IDFusionNewAdapter", "inputs": {"model": ["1", 0], "init": "random", "seed": 0}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "reference_64.png"}},
        "6": {"class_type": "IDFusionEncodeReference", "inputs": {"model": ["1", 0], "vae": ["3", 0], "reference_images": ["5", 0],
                                                                  "timestep": 0, "name": "person one"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a person smiling", "clip": ["2", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        # baseline: the same sampler on the unpatched model
        "19": {"class_type": "KSampler", "inputs": _sampler(["1", 0])},
        "20": {"class_type": "VAEDecode", "inputs": {"samples": ["19", 0], "vae": ["3", 0]}},
        "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "sdxl_baseline"}},
    }


def _sampler(model):
    # one step at cfg 5: cond and uncond go through the UNet in one batch ("text only": the uncond rows see no identity)
    return {"model": model, "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}


def _patched_branch(graph, model, prefix):
    graph["11"] = {"class_type": "KSampler", "inputs": _sampler(model)}
    graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}}
    graph["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}}
    return graph


def run_images(srv, prompt):
    """Queue, wait; ({SaveImage node id: RGB array}, history entry). The history must hold no error."""
    entry = srv.wait(srv.queue(prompt), timeout=900)
    status = entry.get("status") or {}
    assert status.get("status_str") == "success", status
    assert not [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")], status
    images = {}
    for node_id, f in comfy_server.ComfyClient.output_files(entry):
        with Image.open(os.path.join(srv.dir("output"), f.get("subfolder") or "", f["filename"])) as im:
            assert im.size == (64, 64)
            images[node_id] = np.asarray(im.convert("RGB")).astype(np.int16)
    return images, entry


def check_image(img, what):
    # a random model's image is noise, but NaN/Inf anywhere decodes to a flat (black) frame
    assert img.std() > 1.0, f"{what} is flat (std {img.std():.3f}): non-finite values in the sampler?"


def cpu_seconds(srv) -> float:
    """User + system CPU time of the server process so far (independent of other jobs on the machine)."""
    with open(f"/proc/{srv.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_peak(srv, when):
    peak = peak_rss(srv)
    print(f"server peak RSS after {when}: {peak / 1e9:.2f} GB ({peak / 1024 ** 3:.2f} GiB); "
          f"server CPU time so far {cpu_seconds(srv):.0f} s")
    assert peak < PEAK_LIMIT, f"the server's peak RSS {peak / 1e9:.2f} GB is over the suite's {PEAK_LIMIT / 1e9:.0f} GB"


def test_sdxl_apply_changes_the_image(server):
    """IDFusion Apply on the fp8 SDXL UNet: the image differs from the same sampler on the unpatched model, and both
    are finite."""
    prompt = _patched_branch(sdxl_graph(), ["10", 0], "sdxl_apply")
    prompt["10"] = {"class_type": "IDFusionApply", "inputs": {"model": ["1", 0], "adapter": ["4", 0], "identity": ["6", 0],
                                                              "weight": 1.0, "start_at": 0.0, "end_at": 1.0,
                                                              "uncond": "text only", "mode": "adapter default"}}
    images, _ = run_images(server, prompt)
    assert set(images) == {"13", "21"}, images.keys()
    check_image(images["13"], "the IDFusion image")
    check_image(images["21"], "the baseline image")
    diff = np.abs(images["13"] - images["21"]).mean()
    print(f"mean |apply - baseline| = {diff:.2f} (of 255)")
    assert diff > 1.0, "IDFusion Apply did not change the SDXL image"
    with open(os.path.join(server.base_dir, comfy_server.LOG_NAME)) as f:
        log = f.read()
    # the model really is SDXL at fp8 (detected from the state dict), computed in fp32
    assert "Requested to load SDXL" in log and "model weight dtype torch.float8_e5m2, manual cast: torch.float32" in log
    check_peak(server, "Apply")


def test_sdxl_multi_identity_with_masks(server):
    """Apply Multi-Identity with two identities (the reference and its mirror image) placed left and right by two
    masks (ComfyUI's SolidMask/MaskComposite, batched by IDFusion Mask Batch): runs, and changes the image."""
    prompt = _patched_branch(sdxl_graph(), ["10", 0], "sdxl_multi")
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
    images, entry = run_images(server, prompt)
    assert set(images) == {"13", "21"}, images.keys()
    # the node's region preview (a temp PNG, as Preview Image writes) is listed in the history
    assert [n for n, _ in comfy_server.ComfyClient.output_files(entry, types=("temp",))].count("10") == 1, entry["outputs"]
    check_image(images["13"], "the Multi-Identity image")
    diff = np.abs(images["13"] - images["21"]).mean()
    print(f"mean |multi-identity - baseline| = {diff:.2f} (of 255)")
    assert diff > 1.0, "IDFusion Apply Multi-Identity did not change the SDXL image"
    check_peak(server, "Apply Multi-Identity")
