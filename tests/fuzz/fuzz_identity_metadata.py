"""Fuzz target (atheris, coverage-guided): the metadata of an identity or adapter file, entry by entry (layers, encoding,
references, name, format version) over tensors that fit a one-layer model, through Load Identity / Load Adapter and
the file-info summary. Only the pack's own clear errors may come out. Run outside CI:

    COMFYUI_PATH=.hosts/0.3.75/ComfyUI nice -n 15 .hosts/0.3.75/venv/bin/python tests/fuzz/fuzz_identity_metadata.py -max_total_time=180
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402

_setup.load_pack("idfusion.adapter", "idfusion.identity", "nodes.routes")
import atheris  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter  # noqa: E402
from idfusion_pack.idfusion.identity import Identity  # noqa: E402
from idfusion_pack.nodes import routes  # noqa: E402

FOLDER = tempfile.mkdtemp(prefix="idfusion_fuzz_")
PATH = os.path.join(FOLDER, "meta.safetensors")
FIELDS = ["format_version", "base_family", "layers", "encoding", "reference_encoding", "references", "name",
          "training_steps"]
LAYERS = json.dumps([{"key": ["input", 1, 0], "channels": 4, "inner": 4, "heads": 1}])
TENSORS = {
    "identity": {"context": torch.zeros(1, 2, 4), "ref0.latent": torch.zeros(1, 4, 2, 2), "ref0.input.1.0.h_f": torch.zeros(4, 4),
                 "ref0.thumbnail": torch.zeros(2, 2, 3, dtype=torch.uint8)},
    "adapter": {"input.1.0.to_k_f.weight": torch.zeros(4, 4), "input.1.0.to_v_f.weight": torch.zeros(4, 4)},
}


def test_one_input(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    kind = "identity" if fdp.ConsumeBool() else "adapter"
    meta = {"format": f"idfusion.{kind}", "format_version": "1", "base_family": "SD15", "layers": LAYERS,
            "encoding": '{"mode": "cached", "timestep": 0, "text": "zeros"}', "references": "1", "name": "x"}
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        field = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
        meta[field] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    tensors = dict(TENSORS[kind])
    if kind == "identity" and fdp.ConsumeBool():  # format 2: no h_f
        meta["format_version"] = "2"
        tensors.pop("ref0.input.1.0.h_f")
    save_file(tensors, PATH, metadata=meta)
    try:
        (Identity if kind == "identity" else IDFusionAdapter).load(PATH)
    except AdapterError as e:
        assert "meta.safetensors" in str(e), str(e)
    try:
        json.dumps(routes.summarize(meta, "meta.safetensors"), allow_nan=False)
    except routes.FileInfoError as e:
        assert "meta.safetensors" in str(e), str(e)


if __name__ == "__main__":
    _setup.run(test_one_input, {"zero": b"\0" * 16, "one": b"\1" * 64})
