"""IDFusion beside ControlNet and a LoRA on one model, through a REAL ComfyUI server over HTTP (issue 10,
deliverable 3): a random-weight SD1.5 ControlNet built from ComfyUI's own classes and read by its ControlNetLoader,
a random LoRA read by its LoraLoaderModelOnly, and IDFusion Apply, in one workflow. Removing any one of the three
changes the image; nothing crashes. The same server runs the multi-identity example, whose Apply Multi-Identity
node sends its region preview to the frontend (a temp PNG served by /view). The server's peak memory is printed."""
import copy
import fcntl
import hashlib
import inspect
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import comfy_server
import random_models
from conftest import COMFYUI, ROOT

pytestmark = pytest.mark.e2e

BASIC = os.path.join(ROOT, "workflows", "api", "idfusion_basic_api.json")
MULTI = os.path.join(ROOT, "workflows", "api", "idfusion_multi_identity_api.json")
REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")


def cached_file(kind: str, builder) -> str:
    """A random model file written once per builder source into the shared test cache (as the checkpoint is), in a
    child process so its memory never adds to this one's."""
    key = hashlib.sha256((inspect.getsource(builder) + inspect.getsource(random_models.randomize_)).encode()).hexdigest()[:12]
    folder = os.environ.get("IDFUSION_TEST_CACHE") or os.path.join(ROOT, ".hosts", ".cache")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"random_sd15_{kind}_{key}.safetensors")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(path):
            code = (f"import sys; sys.path[:0] = [{COMFYUI!r}, {os.path.join(ROOT, 'scripts')!r}]; import comfy.cli_args; "
                    f"comfy.cli_args.args.cpu = True; import random_models; random_models.{builder.__name__}({path!r})")
            subprocess.run([sys.executable, "-c", code], check=True, timeout=1800)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint):
    base = tmp_path_factory.mktemp("comfy_host")
    for d in ("input", "models/checkpoints", "models/controlnet", "models/loras"):
        os.makedirs(base / d)
    shutil.copyfile(REFERENCE, base / "input" / "idfusion_reference.png")
    control = np.zeros((64, 64, 3), np.uint8)  # a pose-like hint: a bright face-sized disc and bars
    control[16:48, 20:44] = (255, 0, 0)
    control[30:34, 8:56] = (0, 0, 255)
    Image.fromarray(control).save(base / "input" / "control.png")
    os.symlink(random_checkpoint, base / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors")  # the name the workflows use
    os.symlink(cached_file("controlnet", random_models.write_controlnet), base / "models" / "controlnet" / "random_cn.safetensors")
    os.symlink(cached_file("lora", random_models.write_lora), base / "models" / "loras" / "random_lora.safetensors")
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable)
    srv.start(timeout=300)
    try:
        yield srv
    finally:
        peak = peak_rss(srv)
        srv.stop()
        print(f"\nComfyUI server peak RSS: {peak / 2 ** 30:.2f} GiB")


def peak_rss(srv) -> int:
    try:
        with open(f"/proc/{srv.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, AttributeError, StopIteration):
        return 0


def workflow(controlnet=True, lora=True, idfusion=True):
    w = copy.deepcopy(comfy_server.load_workflow(BASIC))
    model = ["1", 0]
    if lora:
        w["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": "random_lora.safetensors",
                                                                     "strength_model": 1.0}}
        model = ["20", 0]
    if idfusion:
        w["5"]["inputs"]["model"] = model
        model = ["5", 0]
    else:
        for n in ("2", "3", "4", "5"):
            del w[n]
    w["9"]["inputs"]["model"] = model
    if controlnet:
        w["21"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "random_cn.safetensors"}}
        w["22"] = {"class_type": "LoadImage", "inputs": {"image": "control.png"}}
        w["23"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["21", 0], "image": ["22", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        w["9"]["inputs"]["positive"], w["9"]["inputs"]["negative"] = ["23", 0], ["23", 1]
    w["11"]["inputs"]["filename_prefix"] = f"host_cn{int(controlnet)}_lora{int(lora)}_id{int(idfusion)}"
    return w


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float64)


def test_controlnet_lora_and_idfusion_on_one_model_each_changes_the_image(server):
    images = {}
    for variant in ("all", "no controlnet", "no lora", "no idfusion"):
        kw = {"all": {}, "no controlnet": {"controlnet": False}, "no lora": {"lora": False}, "no idfusion": {"idfusion": False}}[variant]
        out = [p for p in server.run(workflow(**kw), timeout=900) if os.path.dirname(p) == server.dir("output")]
        assert len(out) == 1, out  # the SaveImage (other nodes may show temp previews)
        images[variant] = pixels(out[0])
        assert images[variant].shape == (64, 64, 3)
    full = images["all"]
    assert 0 < full.mean() < 255, "the full workflow gave a flat image"
    for variant in ("no controlnet", "no lora", "no idfusion"):
        diff = np.abs(images[variant] - full).mean()
        print(f"{variant}: mean |difference| to the full workflow {diff:.2f} / 255")
        assert diff > 0.5, f"removing {variant[3:]} did not change the image"
    print(f"server peak RSS so far: {peak_rss(server) / 2 ** 30:.2f} GiB")


def test_multi_identity_region_preview_reaches_the_frontend(server):
    prompt = comfy_server.load_workflow(MULTI)
    prompt_id = server.queue(prompt)
    entry = server.wait(prompt_id, timeout=900)
    node = next(k for k, v in prompt.items() if v["class_type"] == "IDFusionApplyMultiIdentity")
    (preview,) = entry["outputs"][node]["images"]
    assert preview["type"] == "temp" and preview["filename"].endswith(".png")
    with Image.open(io.BytesIO(server.view(preview))) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (64, 64, 3)
    from idfusion_pack.idfusion.faces import PALETTE
    assert (rgb[:, :30] == PALETTE[0]).all() and (rgb[:, 34:] == PALETTE[1]).all()  # left / right halves, as masked
