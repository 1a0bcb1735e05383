"""Test setup: the real ComfyUI host (path from COMFYUI_PATH, set by the Makefile) and this pack loaded the way
ComfyUI loads a custom node (a package from its __init__.py). No stub modules."""
import contextlib
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI")
if not os.path.isfile(os.path.join(COMFYUI, "comfy", "model_management.py")):
    raise RuntimeError(f"No ComfyUI at {COMFYUI}: run `make setup` (or set COMFYUI_PATH).")
sys.path.insert(0, COMFYUI)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # CI has no GPU; same as `main.py --cpu`

PACK = "idfusion_pack"
if PACK not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)


def pytest_report_header(config):
    import comfyui_version
    return f"ComfyUI host: {comfyui_version.__version__} at {COMFYUI}"


# Models are module-scoped: one full-width SD1.5 UNet is 3.4 GB in fp32, and a session-scoped one stayed alive while
# later modules built more (the suite's largest process reached ~10 GB). Each module that needs one builds it.
@pytest.fixture(scope="module")
def sd15():
    import random_models
    model = random_models.build_model("SD15", seed=1)
    yield model
    _free(model)


@pytest.fixture(scope="module")
def sdxl():
    import torch
    import random_models
    model = random_models.build_model("SDXL", dtype=torch.bfloat16, seed=2)
    yield model
    _free(model)


def _free(model):
    """Drop a module's model now rather than at the end of the session (ComfyUI's loaded-model list and gc)."""
    import gc
    import comfy.model_management as mm
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not model]
    gc.collect()  # the caller's reference goes right after teardown; cycles in it go at the next collection


@pytest.fixture(scope="session")
def sdxl_structure():
    """SDXL's module tree without weights (meta device): enough for layer discovery and family checks."""
    import random_models
    return random_models.build_model("SDXL", device="meta")


def small_unet(seed=0, channels=32, inference=False):
    """An SD1.5-layout UNet (16 attn2 layers, CLIP-L's 768-wide context, ComfyUI's SD15 config class), narrow: for
    training tests where the full width is not the point. inference=True builds it under torch.inference_mode(),
    as ComfyUI's loader nodes do inside a server, so its weights are inference tensors."""
    import contextlib
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    import random_models
    cfg = dict(random_models.unet_config("SD15"), model_channels=channels)
    config = comfy.supported_models.SD15(cfg)
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode() if inference else contextlib.nullcontext():
        model = config.get_model({}, device="cpu")
        random_models.randomize_(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# ---- the random SD1.5 checkpoint file, shared by every session and both hosts -----------------------------
def write_random_checkpoint(path: str, seed: int = 0):
    """The same file as random_models.write_checkpoint (same configs, seeds and fp16 values), built one part at a
    time and halved in place, so the peak is one fp32 UNet (~4 GB) instead of ~7 GB. Atomic."""
    import torch
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.utils
    import random_models as rm
    from comfy.ldm.models.autoencoder import AutoencoderKL
    model = comfy.model_detection.model_config_from_unet_config(rm.unet_config("SD15", torch.float32)).get_model({}, device="cpu")
    rm.randomize_(model.diffusion_model, seed)
    model.half()
    clip = rm._tame_clip(rm.randomize_(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32), seed + 1)).half()
    ae = rm.randomize_(AutoencoderKL(ddconfig=rm.VAE_DDCONFIG, embed_dim=4), seed + 2).half()
    sd = {k: v.contiguous() for k, v in model.state_dict_for_saving(clip.state_dict(), ae.state_dict(), None).items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)


def _checkpoint_cache_path() -> str:
    """Keyed by everything that decides the file's bytes, so an edit to the builders makes a new one."""
    import hashlib
    import inspect
    import json
    import random_models as rm
    key = json.dumps([rm.UNET_CONFIGS["SD15"], rm.VAE_DDCONFIG], sort_keys=True) + inspect.getsource(rm.randomize_) \
        + inspect.getsource(rm._tame_clip) + inspect.getsource(write_random_checkpoint)
    folder = os.environ.get("IDFUSION_TEST_CACHE") or os.path.join(ROOT, ".hosts", ".cache")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"random_sd15_{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors")


@pytest.fixture(scope="session")
def random_checkpoint():
    """A random-weight SD1.5-shaped checkpoint file (~2 GB fp16, UNet + CLIP-L + VAE). Written once into
    .hosts/.cache (or $IDFUSION_TEST_CACHE) and reused by later sessions and the other host; built in a child
    process so its memory never adds to this one's. A lock keeps two concurrent sessions from building it twice."""
    import fcntl
    import pathlib
    import subprocess
    path = _checkpoint_cache_path()
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(path):
            code = ("import sys; sys.path[:0] = [{t!r}, {s!r}]; import conftest; conftest.write_random_checkpoint({p!r})"
                    .format(t=os.path.join(ROOT, "tests"), s=os.path.join(ROOT, "scripts"), p=path))
            subprocess.run([sys.executable, "-c", code], check=True, timeout=1800,
                           env={**os.environ, "COMFYUI_PATH": COMFYUI})
    return pathlib.Path(path)


@pytest.fixture
def idfusion_dir(tmp_path, monkeypatch):
    """An empty models/idfusion for this test, registered through folder_paths like a user's folder."""
    import folder_paths
    d = tmp_path / "idfusion"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "idfusion", ([str(d)], {".safetensors"}))
    return d


@contextlib.contextmanager
def running_server(base, timeout: float = 240):
    """A real ComfyUI server of this host (main.py --cpu, this pack linked into its custom_nodes) in base directory
    `base`, stopped on exit."""
    import comfy_server
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable)
    srv.launch()
    try:
        srv.wait_ready(timeout=timeout)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """save(page, name): a PNG of the page in the test's tmp folder, and in $IDFUSION_SCREENS when that is set."""
    import ui_browser
    dirs = [str(tmp_path_factory.mktemp("screens"))]
    if os.environ.get("IDFUSION_SCREENS"):
        os.makedirs(os.environ["IDFUSION_SCREENS"], exist_ok=True)
        dirs.append(os.environ["IDFUSION_SCREENS"])

    def save(page, name):
        for d in dirs:
            ui_browser.screenshot(page, os.path.join(d, name + ".png"))
    return save


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (scripts/ui_browser.py), one per test module."""
    import ui_browser
    with ui_browser.Browser() as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, server):
    """The stock frontend of the module's own `server` fixture, open in that browser."""
    return browser.open(server.url)
