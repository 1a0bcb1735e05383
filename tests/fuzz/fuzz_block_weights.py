"""Fuzz target (atheris, coverage-guided): the block_weights text of the Apply nodes, and their number inputs (weight,
start_at, end_at) as any float. block_weights must parse to finite factors within bounds or raise a ValueError that
starts with 'block_weights:'; VALIDATE_INPUTS must refuse every non-finite or out-of-range number. Run outside CI:

    COMFYUI_PATH=.hosts/0.3.75/ComfyUI nice -n 15 .hosts/0.3.75/venv/bin/python tests/fuzz/fuzz_block_weights.py -max_total_time=180
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402

_setup.load_pack("idfusion.adapter", "nodes.common", "nodes.apply_nodes")
import atheris  # noqa: E402

from idfusion_pack.idfusion.adapter import Layer  # noqa: E402
from idfusion_pack.nodes import apply_nodes  # noqa: E402

LAYERS = [Layer((b, n, 0), 8, 8, 1) for b, n in (("input", 1), ("input", 2), ("middle", 0), ("output", 3), ("output", 4))]
NAMES = {l.name for l in LAYERS}


def test_one_input(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    value = fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    field = ("weight", "start_at", "end_at")[fdp.ConsumeIntInRange(0, 2)]
    ok = apply_nodes.IDFusionApply.VALIDATE_INPUTS(**{field: value})
    lo, hi = apply_nodes._COMMON[field][1]["min"], apply_nodes._COMMON[field][1]["max"]
    assert (ok is True) == (math.isfinite(value) and lo <= value <= hi), (field, value, ok)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    try:
        out = apply_nodes.parse_block_weights(text, LAYERS)
    except ValueError as e:
        assert str(e).startswith("block_weights:") and len(str(e)) < 600, str(e)
        return
    assert set(out) <= NAMES
    assert all(math.isfinite(v) and 0 <= v <= apply_nodes.MAX_BLOCK_WEIGHT for v in out.values()), out


if __name__ == "__main__":
    _setup.run(test_one_input, {"groups": b"\0" * 9 + b"input:1, middle:0.5, output:1", "indices": b"\1" * 9 + b"0:1, 3:0"})
