"""Test setup: the real ComfyUI host (path from COMFYUI_PATH, set by the Makefile) and this pack loaded the way
ComfyUI loads a custom node (a package from its __init__.py). No stub modules."""
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


@pytest.fixture(scope="session")
def sd15():
    import random_models
    return random_models.build_model("SD15", seed=1)


@pytest.fixture(scope="session")
def sdxl():
    import torch
    import random_models
    return random_models.build_model("SDXL", dtype=torch.bfloat16, seed=2)


@pytest.fixture(scope="session")
def sdxl_structure():
    """SDXL's module tree without weights (meta device): enough for layer discovery and family checks."""
    import random_models
    return random_models.build_model("SDXL", device="meta")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A random-weight SD1.5-shaped checkpoint file (~2 GB, UNet + CLIP-L + VAE), written once per session."""
    import random_models
    path = tmp_path_factory.mktemp("checkpoint") / "random_sd15.safetensors"
    random_models.write_checkpoint(str(path), seed=0)
    yield path
    path.unlink(missing_ok=True)  # pytest keeps the last few tmp dirs; don't keep 2 GB in them


@pytest.fixture
def idfusion_dir(tmp_path, monkeypatch):
    """An empty models/idfusion for this test, registered through folder_paths like a user's folder."""
    import folder_paths
    d = tmp_path / "idfusion"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "idfusion", ([str(d)], {".safetensors"}))
    return d
