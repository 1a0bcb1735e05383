"""Damaged adapter and identity files: a corpus generated here, each one loaded through the real loader nodes under
torch.inference_mode(). Every one must give an AdapterError that names the file and says what to do: never a raw
KeyError / JSONDecodeError / TypeError, never a weight that is NaN, Inf or absurd, and never an allocation decided by
the file's metadata before its tensors were checked."""
import json
import os
import resource
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import idfusion_pack
from conftest import small_unet
from helpers import random_identity
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.identity import Identity

NODES = idfusion_pack.NODE_CLASS_MAPPINGS
FIXES = ("re-export", "re-train", "encode the reference again", "replace it", "update comfyui-idfusion", "convert it",
         "put idfusion")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid adapter and identity (narrow SD1.5 layout, 16 layers), as (tensors, metadata)."""
    model = small_unet(seed=0)
    folder = tmp_path_factory.mktemp("good")
    IDFusionAdapter.fresh(model, init="random", seed=1).save(str(folder / "a.safetensors"))
    ident = random_identity(model, refs=2, tokens=(6,))
    ident.thumbnails = [torch.zeros(8, 8, 3, dtype=torch.uint8)] * 2
    ident.save(str(folder / "i.safetensors"), with_h_f=True)   # format 1: h_f stored
    ident.save(str(folder / "c.safetensors"))                  # format 2 (compact): latents only
    out = {}
    for kind, name in (("adapter", "a"), ("identity", "i"), ("compact identity", "c")):
        with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
            out[kind] = ({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata()))
    return out


# ---- the corpus: name -> function(tensors, meta) changing them in place, or returning raw bytes --------------------
def meta(key, value):
    def damage(t, m):
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    return damage


def layers_edit(fn):
    def damage(t, m):
        layers = json.loads(m["layers"])
        fn(layers)
        m["layers"] = json.dumps(layers)
    return damage


def first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


def tensor_edit(suffix, fn):
    def damage(t, m):
        k = first(t, suffix)
        t[k] = fn(t[k])
    return damage


def drop(suffix):
    def damage(t, m):
        del t[first(t, suffix)]
    return damage


def add(name, value):
    def damage(t, m):
        t[name] = value
    return damage


def setval(v):
    def fn(x):
        x = x.clone()
        x.view(-1)[0] = v
        return x
    return fn


def raw(fn):
    fn.raw = True
    return fn


def header_file(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def huge_layers_file(kind):
    """The review's 332-byte file: metadata declaring a 40000x40000 layer, no tensors."""
    fmt = "idfusion.adapter" if kind == "adapter" else "idfusion.identity"
    m = {"format": fmt, "format_version": "1", "base_family": "SD15", "references": "1", "encoding": "{}",
         "layers": json.dumps([{"key": ["input", 1, 0], "channels": 40000, "inner": 40000, "heads": 8}])}
    return header_file({"__metadata__": m})


def huge_tensor_file(kind):
    """A header that declares a 40000x40000 float tensor whose bytes are not in the file."""
    fmt = "idfusion.adapter" if kind == "adapter" else "idfusion.identity"
    m = {"format": fmt, "format_version": "1", "layers": json.dumps([{"key": ["input", 1, 0], "channels": 40000,
                                                                       "inner": 40000, "heads": 8}])}
    return header_file({"__metadata__": m, "input.1.0.to_k_f.weight": {"dtype": "F32", "shape": [40000, 40000],
                                                                        "data_offsets": [0, 40000 * 40000 * 4]}}, b"\0" * 64)


DEEP = "[" * 100_000 + "]" * 100_000  # issue 18: json.loads raised RecursionError, which is not a ValueError

COMMON = {
    "layers_nested_100000_deep": meta("layers", DEEP),
    "layers_longer_than_1_MB": meta("layers", "[" + " " * (1 << 20) + "]"),
    "layers_bad_json": meta("layers", "[{not json"),
    "layers_not_a_list": meta("layers", '{"key": 1}'),
    "layers_empty": meta("layers", "[]"),
    "layers_null": meta("layers", "null"),
    "layers_missing": meta("layers", None),
    "layer_missing_channels": layers_edit(lambda L: L[0].pop("channels")),
    "layer_key_a_string": layers_edit(lambda L: L[0].update(key="input.1.0")),
    "layer_key_unknown_block": layers_edit(lambda L: L[0].update(key=["side", 1, 0])),
    "layer_key_two_parts": layers_edit(lambda L: L[0].update(key=["input", 1])),
    "layer_channels_negative": layers_edit(lambda L: L[0].update(channels=-32)),
    "layer_channels_a_string": layers_edit(lambda L: L[0].update(channels="32")),
    "layer_channels_a_bool": layers_edit(lambda L: L[0].update(channels=True)),
    "layer_channels_a_float": layers_edit(lambda L: L[0].update(channels=32.5)),
    "layer_heads_zero": layers_edit(lambda L: L[0].update(heads=0)),
    "layer_inner_not_divisible_by_heads": layers_edit(lambda L: L[0].update(inner=33)),
    "layer_listed_twice": layers_edit(lambda L: L.append(dict(L[0]))),
    "layer_not_an_object": layers_edit(lambda L: L.__setitem__(0, 7)),
    "layers_too_many": layers_edit(lambda L: L.extend({"key": ["output", 99, i], "channels": 1, "inner": 1, "heads": 1}
                                                      for i in range(1100))),
    "layer_channels_huge": layers_edit(lambda L: L[0].update(channels=1 << 20)),
    "format_missing": meta("format", None),
    "format_other_tool": meta("format", "kohya.lora"),
    "format_version_text": meta("format_version", "one"),
    "format_version_zero": meta("format_version", "0"),
    "format_version_negative": meta("format_version", "-1"),
    "format_version_newer": meta("format_version", "7"),
    "base_family_control_chars": meta("base_family", "SD15\n\x1b[31m"),
    "base_family_too_long": meta("base_family", "S" * 500),
    "no_metadata": raw(lambda data: _without_metadata(data)),
    "truncated_half": raw(lambda data: data[: len(data) // 2]),
    "truncated_header": raw(lambda data: data[:20]),
    "empty_file": raw(lambda data: b""),
    "random_bytes": raw(lambda data: bytes(range(256)) * 4),
    "header_length_beyond_file": raw(lambda data: struct.pack("<Q", 1 << 40) + data[8:]),
    "header_not_json": raw(lambda data: struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16),
    "tensor_bytes_missing": raw(lambda data: data[:-4]),
}
ADAPTER = {
    **COMMON,
    "declares_40000x40000_layer": raw(lambda data: huge_layers_file("adapter")),
    "declares_40000x40000_tensor": raw(lambda data: huge_tensor_file("adapter")),
    "tensor_missing": drop("to_v_f.weight"),
    "tensor_extra": add("input.1.0.to_q_f.weight", torch.zeros(2, 2)),
    "tensor_wrong_shape": tensor_edit("to_k_f.weight", lambda x: torch.zeros(7, 7)),
    "tensor_transposed": tensor_edit("input.1.0.to_k_f.weight", lambda x: x.t().contiguous() if x.shape[0] != x.shape[1] else torch.zeros(x.shape[0], x.shape[1] + 1)),
    "tensor_int32": tensor_edit("to_k_f.weight", lambda x: x.to(torch.int32)),
    "tensor_uint8": tensor_edit("to_v_f.weight", lambda x: x.to(torch.uint8)),
    "tensor_bool": tensor_edit("to_v_f.weight", lambda x: x > 0),
    "weight_nan": tensor_edit("to_k_f.weight", setval(float("nan"))),
    "weight_plus_inf": tensor_edit("to_v_f.weight", setval(float("inf"))),
    "weight_minus_inf_fp16": tensor_edit("to_v_f.weight", lambda x: setval(float("-inf"))(x.half())),
    "weight_near_float_max": tensor_edit("to_k_f.weight", setval(3e38)),
    "weight_absurd_1e5": tensor_edit("to_k_f.weight", setval(1e5)),
    "reference_encoding_bad_json": meta("reference_encoding", "{mode: cached"),
    "reference_encoding_nested_deep": meta("reference_encoding", '{"mode": ' + DEEP + "}"),
    "reference_encoding_not_object": meta("reference_encoding", '["cached"]'),
    "reference_encoding_unknown_mode": meta("reference_encoding", '{"mode": "sometimes", "timestep": 0, "text": "zeros"}'),
    "reference_encoding_timestep_out_of_range": meta("reference_encoding", '{"mode": "cached", "timestep": 5000, "text": "zeros"}'),
    "reference_encoding_timestep_a_string": meta("reference_encoding", '{"mode": "cached", "timestep": "0", "text": "zeros"}'),
    "an_identity_file": raw(lambda data: None),  # filled in by the test: an identity offered as an adapter
}
IDENTITY = {
    **COMMON,
    "declares_40000x40000_layer": raw(lambda data: huge_layers_file("identity")),
    "references_missing": meta("references", None),
    "references_zero": meta("references", "0"),
    "references_text": meta("references", "two"),
    "references_huge": meta("references", "100000"),
    "references_more_than_stored": meta("references", "3"),
    "references_fewer_than_stored": meta("references", "1"),
    "encoding_missing": meta("encoding", None),
    "encoding_bad_json": meta("encoding", "{"),
    "encoding_nested_deep": meta("encoding", DEEP),
    "encoding_unknown_text": meta("encoding", '{"mode": "cached", "timestep": 0, "text": "loud"}'),
    "name_with_newline": meta("name", "ann\nrm -rf"),
    "name_too_long": meta("name", "a" * 1000),
    "h_f_missing": drop(".h_f"),
    "latent_missing": drop("ref1.latent"),
    "context_missing": drop("context"),
    "tensor_extra": add("ref0.input.1.0.k_f", torch.zeros(2, 2)),
    "h_f_wrong_channels": tensor_edit("ref0.input.1.0.h_f", lambda x: torch.zeros(x.shape[0], x.shape[1] + 1)),
    "h_f_more_tokens_than_latent": tensor_edit("ref0.input.1.0.h_f", lambda x: torch.zeros(65, x.shape[1])),
    "h_f_three_dims": tensor_edit("ref0.input.1.0.h_f", lambda x: x[None]),
    "h_f_int64": tensor_edit("ref0.input.1.0.h_f", lambda x: x.long()),
    "h_f_nan": tensor_edit("ref1.middle.0.0.h_f", setval(float("nan"))),
    "h_f_inf": tensor_edit("ref1.output.3.0.h_f", setval(float("inf"))),
    "latent_huge": tensor_edit("ref0.latent", setval(1e30)),
    "latent_three_dims": tensor_edit("ref0.latent", lambda x: x[0]),
    "context_two_dims": tensor_edit("context", lambda x: x[0]),
    "context_nan": tensor_edit("context", setval(float("nan"))),
    "thumbnail_float": tensor_edit("ref0.thumbnail", lambda x: x.float()),
    "thumbnail_too_big": tensor_edit("ref0.thumbnail", lambda x: torch.zeros(65, 65, 3, dtype=torch.uint8)),
    "thumbnail_grey": tensor_edit("ref0.thumbnail", lambda x: x[..., 0].contiguous()),
    "thumbnail_of_missing_reference": add("ref2.thumbnail", torch.zeros(8, 8, 3, dtype=torch.uint8)),
    "an_adapter_file": raw(lambda data: None),  # filled in by the test
}
COMPACT = {  # format 2: no h_f; the latents are what the reference pass will run on
    **{k: v for k, v in COMMON.items() if not k.startswith("format_version")},
    "format_version_newer": meta("format_version", "3"),
    "references_more_than_stored": meta("references", "3"),
    "latent_missing": drop("ref1.latent"),
    "latent_nan": tensor_edit("ref0.latent", setval(float("nan"))),
    "latent_side_beyond_4096_px": tensor_edit("ref0.latent", lambda x: torch.zeros(1, 4, 2, 600)),
    # issue 18: a 256x256 latent was under the per-side cap and hung the server in its reference pass
    "latent_256x256_beyond_the_reference_pass_bound": tensor_edit("ref0.latent", lambda x: torch.zeros(1, 4, 256, 256)),
    "context_of_3000_tokens": tensor_edit("context", lambda x: torch.zeros(1, 3000, x.shape[2])),
    "latent_int8": tensor_edit("ref1.latent", lambda x: x.to(torch.int8)),
    "h_f_in_a_compact_file": add("ref0.input.1.0.h_f", torch.zeros(6, 32)),
    "context_missing": drop("context"),
    "context_inf": tensor_edit("context", setval(float("-inf"))),
    "thumbnail_too_big": tensor_edit("ref1.thumbnail", lambda x: torch.zeros(3, 65, 3, dtype=torch.uint8)),
    "an_adapter_file": raw(lambda data: None),
}
CORPUS = {"adapter": ADAPTER, "identity": IDENTITY, "compact identity": COMPACT}


def _without_metadata(data: bytes) -> bytes:
    n, = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def write_case(folder, kind, case, good):
    tensors, m = good[kind]
    tensors, m = dict(tensors), dict(m)
    damage = CORPUS[kind][case]
    path = folder / f"{case}.safetensors"
    if getattr(damage, "raw", False):
        save_file(tensors, str(path), metadata=m)
        data = damage(path.read_bytes())
        if data is None:  # the other kind of IDFusion file
            other = good["identity" if kind == "adapter" else "adapter"]
            save_file(other[0], str(path), metadata=other[1])
        else:
            path.write_bytes(data)
    else:
        damage(tensors, m)
        save_file(tensors, str(path), metadata=m)
    return path


def load_through_node(kind, name):
    if kind == "adapter":
        return NODES["IDFusionAdapterLoader"]().load(name)
    return NODES["IDFusionLoadIdentity"]().load(name)


CASES = [(kind, c) for kind, cases in CORPUS.items() for c in cases]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 50, len(CASES)


@pytest.mark.parametrize("kind,case", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_damaged_file_gives_a_clear_error_naming_the_file(kind, case, good, idfusion_dir):
    folder = idfusion_dir if kind == "adapter" else idfusion_dir / "identities"
    folder.mkdir(exist_ok=True)
    path = write_case(folder, kind, case, good)
    name = path.name if kind == "adapter" else f"identities/{path.name}"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode(), pytest.raises(AdapterError) as e:
        load_through_node(kind, name)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    msg = str(e.value)
    print(f"{kind}/{case}: {msg}")
    assert path.name in msg, msg
    assert any(f in msg.lower() for f in FIXES), f"the message does not say what to do: {msg}"
    assert "\n" not in msg and "\x1b" not in msg, "a control character from the file reached the message"
    assert grew_mb < 200, f"loading a damaged file grew the process by {grew_mb:.0f} MB"


def test_undamaged_files_still_load_and_old_identities_without_thumbnails_too(good, idfusion_dir):
    save_file(*good["adapter"][:1], str(idfusion_dir / "ok.safetensors"), metadata=good["adapter"][1])
    (idfusion_dir / "identities").mkdir()
    tensors, m = good["identity"]
    old = {k: v for k, v in tensors.items() if not k.endswith(".thumbnail")}
    save_file(old, str(idfusion_dir / "identities" / "old.safetensors"), metadata=m)
    with torch.inference_mode():
        adapter, = NODES["IDFusionAdapterLoader"]().load("ok.safetensors")
        out = NODES["IDFusionLoadIdentity"]().load("identities/old.safetensors")
    assert len(adapter.layers) == 16
    identity, = out["result"]
    assert identity.references == 2 and identity.thumbnails == [] and out["ui"]["images"] == []


def test_the_332_byte_file_is_refused_before_any_allocation(idfusion_dir):
    data = huge_layers_file("adapter")
    (idfusion_dir / "huge.safetensors").write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(AdapterError, match=r"huge.safetensors.*is missing"):
        IDFusionAdapter.load(str(idfusion_dir / "huge.safetensors"))
    assert len(data) < 400
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 100 * 1024  # KB: 12.8 GB was attempted


def test_identity_roundtrip_keeps_thumbnails(good, tmp_path):
    tensors, m = good["identity"]
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=m)
    ident = Identity.load(str(tmp_path / "t.safetensors"))
    assert len(ident.thumbnails) == 2 and ident.thumbnails[0].dtype == torch.uint8
