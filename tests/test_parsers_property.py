"""Property-based tests (hypothesis) of every parser a shared file or a typed value reaches (issue 18): safetensors
headers and metadata (adapter, identity), the file-info summary, block_weights text and Apply's number checks. Each
property: the parser returns a well-formed value or raises the pack's own clear error, never anything else. Bounded
for CI (max_examples, deadline); the coverage-guided fuzzers for the same parsers are tests/fuzz/fuzz_*.py."""
import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from idfusion_pack.idfusion import adapter as A
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter, Layer
from idfusion_pack.idfusion.identity import Identity
from idfusion_pack.nodes import apply_nodes, routes

# database=None: no .hypothesis/ example folder written into the working tree
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

LAYERS = [Layer(("input", 1, 0), 32, 32, 4), Layer(("input", 2, 0), 32, 32, 4), Layer(("middle", 0, 0), 64, 64, 4),
          Layer(("output", 3, 0), 32, 32, 4)]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
                           max_leaves=25)
json_text = json_values.map(lambda v: json.dumps(v)) | st.text(max_size=200) | st.sampled_from(
    ["[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "1" * 5000, "NaN", "-Infinity", "[1e999]", "²"])


# ---- block_weights -----------------------------------------------------------------------------------------------
weight_text = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                        st.text(alphabet="0123456789.e+-_²٣ ", max_size=12), st.sampled_from(["1e300", "nan", "inf", "-0"]))
entry = st.one_of(st.tuples(st.sampled_from(["input", "middle", "output", "INPUT", "side", "²", "-1", "1" * 50]) |
                            st.integers(-5, 10).map(str) | st.text(max_size=6), weight_text)
                  .map(lambda t: f"{t[0]}:{t[1]}"), st.text(max_size=20))


@BOUNDED
@given(st.lists(entry, max_size=6).map(", ".join) | st.text(max_size=100))
def test_block_weights_parse_or_refuse_clearly(text):
    try:
        out = apply_nodes.parse_block_weights(text, LAYERS)
    except ValueError as e:
        msg = str(e)
        assert msg.startswith("block_weights:") and len(msg) < 600, msg
        return
    names = {l.name for l in LAYERS}
    assert set(out) <= names
    assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= apply_nodes.MAX_BLOCK_WEIGHT for v in out.values())


@BOUNDED
@given(st.dictionaries(st.integers(0, len(LAYERS) - 1), st.floats(0, 10), max_size=4),
       st.dictionaries(st.sampled_from(["input", "middle", "output"]), st.floats(0, 10), max_size=3))
def test_valid_block_weights_give_each_layer_its_factor(indices, groups):
    text = ", ".join([f"{g}:{v!r}" for g, v in groups.items()] + [f"{i}:{v!r}" for i, v in indices.items()])
    out = apply_nodes.parse_block_weights(text, LAYERS)
    for i, layer in enumerate(LAYERS):
        want = indices.get(i, groups.get(layer.key[0]))
        assert out.get(layer.name) == want


# ---- Apply numbers -------------------------------------------------------------------------------------------------
@BOUNDED
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30) | st.booleans(),
       st.sampled_from(["weight", "start_at", "end_at"]))
@example(float("nan"), "weight")  # always tried: JSON NaN is what passed ComfyUI's own min/max check
@example(float("nan"), "start_at")
def test_apply_numbers_pass_only_when_finite_and_in_range(value, field):
    spec = apply_nodes._COMMON[field][1]
    ok = apply_nodes.IDFusionApply.VALIDATE_INPUTS(**{field: value})
    good = not isinstance(value, bool) and math.isfinite(value) and spec["min"] <= value <= spec["max"]
    assert (ok is True) == good, (value, ok)
    if not good:
        assert isinstance(ok, str) and ok.startswith(field)


# ---- adapter / identity metadata ---------------------------------------------------------------------------------
@BOUNDED
@given(json_text)
def test_metadata_parsers_return_a_value_or_a_clear_problem(text):
    for fn, args in ((A.parse_layers, ()), (A.parse_encoding, ("encoding",)), (A.parse_family, ())):
        try:
            fn(text, *args)
        except A._Bad as e:
            assert str(e) and len(str(e)) < 1000


def _write(path, header: dict | None = None, raw: bytes | None = None):
    if raw is None:
        h = json.dumps(header).encode()
        raw = struct.pack("<Q", len(h)) + h
    with open(path, "wb") as f:
        f.write(raw)


META_KEYS = ["format", "format_version", "base_family", "layers", "reference_encoding", "encoding", "references", "name"]
meta_dicts = st.fixed_dictionaries({"format": st.sampled_from(["idfusion.adapter", "idfusion.identity", "x"]),
                                    "format_version": st.sampled_from(["1", "2", "3", "²", "0", "01", ""]) | st.text(max_size=4)},
                                   optional={k: json_text for k in META_KEYS[2:]})
tensor_entries = st.dictionaries(
    st.sampled_from(["context", "y", "ref0.latent", "ref0.thumbnail", "input.1.0.to_k_f.weight", "ref0.input.1.0.h_f"]),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "U8", "I64", "BOOL", "X"]),
                           "shape": st.lists(st.integers(-1, 70000), max_size=5),
                           "data_offsets": st.tuples(st.integers(-1, 64), st.integers(-1, 64)).map(list)}), max_size=3)


@BOUNDED
@given(meta_dicts, tensor_entries)
def test_adapter_and_identity_files_load_or_refuse_naming_the_file(meta, tensors):
    header = {"__metadata__": meta, **tensors}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "prop.safetensors")
        h = json.dumps(header).encode()
        _write(path, raw=struct.pack("<Q", len(h)) + h + b"\0" * 64)
        for load in (IDFusionAdapter.load, Identity.load):
            try:
                load(path)
            except AdapterError as e:
                assert "prop.safetensors" in str(e), str(e)


@BOUNDED
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_as_a_damaged_file(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bytes.safetensors")
        _write(path, raw=data)
        for load in (IDFusionAdapter.load, Identity.load):
            with pytest.raises(AdapterError, match="bytes.safetensors"):
                load(path)
        try:
            routes.metadata(routes.read_header(path, "bytes.safetensors"), "bytes.safetensors")
        except routes.FileInfoError as e:
            assert "bytes.safetensors" in str(e)


# ---- GET /idfusion/file_info's summary -------------------------------------------------------------------------------
@BOUNDED
@given(meta_dicts, st.dictionaries(st.sampled_from(["training_steps", "family", "name", "references"]),
                                   st.text(max_size=12) | st.sampled_from(["²", "١٢", "9" * 40]), max_size=4))
def test_file_info_summary_is_strict_json_or_a_422_naming_the_file(meta, extra):
    meta = {**meta, **extra}
    try:
        info = routes.summarize(meta, "f.safetensors")
    except routes.FileInfoError as e:
        assert e.status == 422 and "f.safetensors" in str(e)
        return
    json.dumps(info, allow_nan=False)  # what the page's JSON.parse accepts
    for key in ("training_steps", "references", "layers"):
        v = info.get(key)
        assert v is None or isinstance(v, (int, str, dict)), (key, v)


@BOUNDED
@given(st.recursive(st.none() | st.integers() | st.text(max_size=5) | st.floats(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10))
def test_file_info_metadata_must_be_an_object_of_strings(value):
    header = {"__metadata__": value}
    assume(value is not None)
    try:
        meta = routes.metadata(header, "m.safetensors")
    except routes.FileInfoError as e:
        assert e.status == 422 and "m.safetensors" in str(e)
        return
    assert isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())


def test_the_pack_is_loaded_from_this_tree():  # guards against testing an installed copy
    assert os.path.dirname(os.path.dirname(os.path.abspath(A.__file__))) == os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert torch.__version__
