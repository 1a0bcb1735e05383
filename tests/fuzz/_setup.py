"""Shared setup of the atheris fuzz targets (tests/fuzz/fuzz_*.py): the real ComfyUI host on sys.path and this pack
loaded as ComfyUI loads it, with atheris' coverage instrumentation on the pack's own modules only. Not a test module:
pytest collects test_*.py only, so these scripts never run in CI (they need atheris and run until stopped)."""
import importlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFYUI = os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".hosts", "0.3.75", "ComfyUI")
PACK = "idfusion_pack"


def load_pack(*modules: str):
    """Import the named modules of the pack (e.g. "idfusion.adapter", "nodes.routes"), instrumented; ComfyUI itself
    and torch stay uninstrumented. The pack's and nodes/ package __init__ files are not run (they import every node
    family), so a target starts in seconds and its coverage is its parser's."""
    import atheris
    import types
    sys.path[:0] = [COMFYUI, os.path.join(ROOT, "scripts")]
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import folder_paths  # noqa: F401  (before the pack, as in a server)
    for name, folder in ((PACK, ROOT), (PACK + ".nodes", os.path.join(ROOT, "nodes"))):
        package = types.ModuleType(name)
        package.__path__ = [folder]
        sys.modules[name] = package
    loaded = []
    with atheris.instrument_imports(include=[PACK]):
        for m in modules:
            loaded.append(importlib.import_module(f"{PACK}.{m}"))
    return loaded


def seed_dir(seeds: dict) -> str:
    """A corpus folder holding the given seeds (name -> bytes), for libFuzzer to start from."""
    folder = tempfile.mkdtemp(prefix="idfusion_fuzz_corpus_")
    for name, data in seeds.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


def run(test_one_input, seeds: dict):
    """atheris.Setup + Fuzz with the command line's libFuzzer flags (e.g. -max_total_time=180); a seed corpus is added
    when the command line names no corpus folder."""
    import atheris
    argv = list(sys.argv)
    if not any(os.path.isdir(a) for a in argv[1:]):
        argv.append(seed_dir(seeds))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
