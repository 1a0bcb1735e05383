"""Fuzz target (atheris, coverage-guided): any bytes as a .safetensors file offered to the pack's readers: Load Adapter,
Load Identity (both formats) and GET /idfusion/file_info's header reader and summary. Every input must end in the
pack's own clear error (AdapterError / FileInfoError naming the file) or a clean result; any other exception is a
finding. Run outside CI:

    COMFYUI_PATH=.hosts/0.3.75/ComfyUI nice -n 15 .hosts/0.3.75/venv/bin/python tests/fuzz/fuzz_safetensors.py -max_total_time=180
"""
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402

_setup.load_pack("idfusion.adapter", "idfusion.identity", "nodes.routes")
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter  # noqa: E402
from idfusion_pack.idfusion.identity import Identity  # noqa: E402
from idfusion_pack.nodes import routes  # noqa: E402

FOLDER = tempfile.mkdtemp(prefix="idfusion_fuzz_")
PATH = os.path.join(FOLDER, "fuzz.safetensors")


def test_one_input(data: bytes):
    with open(PATH, "wb") as f:
        f.write(data)
    for load in (IDFusionAdapter.load, Identity.load):
        try:
            load(PATH)
        except AdapterError as e:
            assert "fuzz.safetensors" in str(e), str(e)
    try:
        info = routes.summarize(routes.metadata(routes.read_header(PATH, "fuzz.safetensors"), "fuzz.safetensors"),
                                "fuzz.safetensors")
        json.dumps(info, allow_nan=False)
    except routes.FileInfoError as e:
        assert "fuzz.safetensors" in str(e), str(e)


def _file(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def seeds() -> dict:
    layers = json.dumps([{"key": ["input", 1, 0], "channels": 4, "inner": 4, "heads": 1}])
    w = struct.pack("<16f", *([0.1] * 16))
    adapter = _file({"__metadata__": {"format": "idfusion.adapter", "format_version": "1", "base_family": "SD15",
                                      "layers": layers, "reference_encoding": '{"mode": "cached", "timestep": 0, "text": "zeros"}'},
                     "input.1.0.to_k_f.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                     "input.1.0.to_v_f.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]}}, w + w)
    identity = _file({"__metadata__": {"format": "idfusion.identity", "format_version": "2", "base_family": "SD15",
                                       "layers": layers, "encoding": '{"mode": "cached", "timestep": 0, "text": "zeros"}',
                                       "references": "1", "name": "x"},
                      "context": {"dtype": "F32", "shape": [1, 2, 2], "data_offsets": [0, 16]},
                      "ref0.latent": {"dtype": "F32", "shape": [1, 1, 2, 2], "data_offsets": [16, 32]}}, b"\0" * 32)
    return {"adapter": adapter, "identity": identity, "empty": b""}


if __name__ == "__main__":
    _setup.run(test_one_input, seeds())
