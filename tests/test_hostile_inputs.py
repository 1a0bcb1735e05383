"""Hostile input, round two (issue 18), in this process with the real ComfyUI host: the file-info route's summary of
crafted files, shared compact identities at Apply, a reference pass bounded in size and stopped by ComfyUI's interrupt,
non-finite and absurd Apply / Train inputs, and training images of every Pillow mode with skipped files reported on
the node. The same surfaces through a real server are in tests/test_hostile_server.py. Nodes run under
torch.inference_mode(), as ComfyUI runs them."""
import contextlib
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import idfusion_pack
from conftest import small_unet
from helpers import make_face_dataset
from idfusion_pack.idfusion.adapter import AdapterError, IDFusionAdapter
from idfusion_pack.idfusion.dataset import MAX_PIXELS, FaceDataset
from idfusion_pack.idfusion.identity import MAX_LATENT_TOKENS, Identity
from idfusion_pack.nodes import routes

NODES = idfusion_pack.NODE_CLASS_MAPPINGS
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recurses once per level: RecursionError, not ValueError


def node(name, *args, **kwargs):
    cls = NODES[name]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    return out["result"] if isinstance(out, dict) and "result" in out else out


def header_file(path, header: dict, body: bytes = b""):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return path


@pytest.fixture(scope="module")
def model():
    return small_unet(seed=0, inference=True)


@pytest.fixture(scope="module")
def adapter(model):
    return IDFusionAdapter.fresh(model, init="random", seed=1)


@pytest.fixture(scope="module")
def compact(model, tmp_path_factory):
    """A valid compact (format 2) identity for the model, as (tensors, metadata) to damage."""
    from helpers import random_identity
    from safetensors import safe_open
    ident = random_identity(model, refs=1)
    ident.h_f = [None]
    ident.latents = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))]
    path = tmp_path_factory.mktemp("compact") / "c.safetensors"
    ident.save(str(path))
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


# ---- GET /idfusion/file_info: crafted files give a 422 naming the file, never an exception ------------------------
def _adapter_meta(**kw):
    return {"format": "idfusion.adapter", "format_version": "1", "base_family": "SD15", "layers": "[]", **kw}


def _identity_meta(**kw):
    return {"format": "idfusion.identity", "format_version": "2", "base_family": "SD15", "layers": "[]",
            "encoding": "{}", "references": "1", "name": "x", **kw}


FILE_INFO_422 = {  # file name -> header; each one raised (RecursionError, AttributeError, ValueError) before the fix
    "deep_layers.safetensors": {"__metadata__": _adapter_meta(layers=DEEP)},
    "deep_reference_encoding.safetensors": {"__metadata__": _adapter_meta(reference_encoding=DEEP)},
    "identities/deep_encoding.safetensors": {"__metadata__": _identity_meta(encoding=DEEP)},
    "deep_header.safetensors": None,  # the header JSON itself nested 100000 deep
    "metadata_a_list.safetensors": {"__metadata__": ["format", "idfusion.adapter"]},
    "metadata_values_not_strings.safetensors": {"__metadata__": {"format": {"x": 1}, "layers": 5}},
}


def _write_file_info_case(folder, name, header):
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    if header is None:
        data = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()
        path.write_bytes(struct.pack("<Q", len(data)) + data)
    else:
        header_file(path, header)
    return path


@pytest.mark.parametrize("name", list(FILE_INFO_422))
def test_file_info_refuses_a_crafted_header_with_a_422_naming_the_file(name, idfusion_dir):
    _write_file_info_case(idfusion_dir, name, FILE_INFO_422[name])
    with pytest.raises(routes.FileInfoError) as e:
        routes.file_info(name)
    assert e.value.status == 422 and name in str(e.value), str(e.value)


def test_file_info_reads_non_ascii_digits_and_odd_numbers_as_unknown_not_an_exception(idfusion_dir):
    """'²'.isdigit() is True but int('²') raises: training_steps and references were read with isdigit()."""
    header_file(idfusion_dir / "steps_superscript.safetensors", {"__metadata__": _adapter_meta(
        training_steps="²", reference_encoding='{"mode": "cached", "timestep": 1e999, "text": "zeros"}')})
    (idfusion_dir / "identities").mkdir()
    header_file(idfusion_dir / "identities" / "refs_superscript.safetensors",
                {"__metadata__": _identity_meta(references="²", name="n" * 5000)})
    adapter = routes.file_info("steps_superscript.safetensors")
    assert adapter["training_steps"] is None and adapter["reference_encoding"] == {"mode": "cached", "text": "zeros"}
    identity = routes.file_info("identities/refs_superscript.safetensors")
    assert identity["references"] == "²" and len(identity["identity_name"]) == routes.MAX_TEXT
    for info in (adapter, identity):  # what the route sends must be strict JSON (no Infinity/NaN)
        json.dumps(info, allow_nan=False)


def test_file_info_survives_a_damaged_training_state_next_to_the_adapter(idfusion_dir):
    header_file(idfusion_dir / "mine.safetensors", {"__metadata__": _adapter_meta()})
    (idfusion_dir / "training").mkdir()
    header_file(idfusion_dir / "training" / "mine.train-state.safetensors",
                {"__metadata__": {"format": "idfusion.train_state", "step": "3", "config": DEEP}})
    assert routes.file_info("mine.safetensors")["training_steps"] == {"done": 3, "planned": None}
    header_file(idfusion_dir / "training" / "mine.train-state.safetensors",
                {"__metadata__": {"format": "idfusion.train_state", "step": "3", "config": "[1, 2]"}})
    assert routes.file_info("mine.safetensors")["training_steps"] == {"done": 3, "planned": None}


# ---- shared compact identities at Apply: clear errors naming the file, before any reference pass -------------------
def _load_damaged(folder, tensors, meta, name):
    (folder / "identities").mkdir(exist_ok=True)
    save_file(tensors, str(folder / "identities" / name), metadata=meta)
    out = NODES["IDFusionLoadIdentity"]()
    with torch.inference_mode():
        return out.load(f"identities/{name}")["result"][0]


def _apply_error(model, adapter, identity):
    with pytest.raises(AdapterError) as e:
        node("IDFusionApply", model, adapter, identity, 1.0, 0.0, 1.0, "text only", "cached")
    frames = [f.name for f in e.traceback]
    assert "reference_h_f" not in frames and "run_reference_pass" not in frames, "refused only after the pass started"
    return str(e.value)


def test_compact_identity_with_another_models_text_width_is_refused_naming_the_file(model, adapter, compact, idfusion_dir):
    """The issue's file: context (1, 77, 5) against a model whose cross-attention takes 768 (raw 'mat1 and mat2')."""
    tensors, meta = compact
    identity = _load_damaged(idfusion_dir, {**tensors, "context": torch.zeros(1, 77, 5)}, meta, "ctx5.safetensors")
    msg = _apply_error(model, adapter, identity)
    assert "ctx5.safetensors" in msg and "(1, 77, 5)" in msg and "768" in msg and "encode the reference again" in msg, msg


def test_compact_identity_with_y_on_a_model_without_adm_is_refused_naming_the_file(model, adapter, compact, idfusion_dir):
    """A `y` (SDXL's pooled text) fed to a model without ADM hit ComfyUI's bare AssertionError inside the UNet."""
    tensors, meta = compact
    identity = _load_damaged(idfusion_dir, {**tensors, "y": torch.zeros(1, 2816)}, meta, "with_y.safetensors")
    msg = _apply_error(model, adapter, identity)
    assert "with_y.safetensors" in msg and "ADM" in msg, msg


def test_identity_and_adapter_metadata_nested_deep_are_refused_naming_the_file(compact, idfusion_dir):
    tensors, meta = compact
    with pytest.raises(AdapterError, match=r"deep\.safetensors.*nested too deep"):
        _load_damaged(idfusion_dir, tensors, {**meta, "layers": DEEP}, "deep.safetensors")
    save_file({}, str(idfusion_dir / "deep_adapter.safetensors"), metadata=_adapter_meta(reference_encoding=DEEP, layers=DEEP))
    with pytest.raises(AdapterError, match=r"deep_adapter\.safetensors.*nested too deep"):
        NODES["IDFusionAdapterLoader"]().load("deep_adapter.safetensors")


def test_per_step_mode_refuses_references_of_different_sizes_before_sampling(model, adapter):
    from helpers import random_identity
    ident = random_identity(model, refs=2)
    ident.latents = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 16)]
    with pytest.raises(AdapterError, match="different latent sizes"):
        node("IDFusionApply", model, adapter, ident, 1.0, 0.0, 1.0, "text only", "per_step")


# ---- the reference pass: bounded before it starts, and stopped by ComfyUI's interrupt ------------------------------
def test_a_compact_identity_beyond_the_reference_pass_bound_is_refused_at_load(compact, idfusion_dir):
    """The issue's 6.3 MB file: a 256x256 latent (under the old 512-per-side cap) hung the server for minutes."""
    tensors, meta = compact
    big = {**tensors, "ref0.latent": torch.zeros(1, 4, 256, 256)}
    with pytest.raises(AdapterError, match=r"latent256\.safetensors.*65536 latent positions.*16384") as e:
        _load_damaged(idfusion_dir, big, meta, "latent256.safetensors")
    assert "encode the reference again" in str(e.value).lower()
    at_bound = {**tensors, "ref0.latent": torch.zeros(1, 4, 128, 128)}
    assert _load_damaged(idfusion_dir, at_bound, meta, "latent128.safetensors").latents[0].shape[-1] == 128


@contextlib.contextmanager
def interrupt_set():
    """ComfyUI's interrupt flag (Cancel) set beforehand: the bound must refuse before anything runs. Were the bound
    gone or raised, the reference pass would start and raise InterruptProcessingException at its first layer, so the
    test fails at once instead of running a pass for minutes."""
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        yield
    finally:
        mm.interrupt_current_processing(False)


def test_encode_reference_refuses_an_image_beyond_the_bound_so_every_saved_identity_loads():
    """Refused from the image size and the VAE's downscale_ratio, before the VAE encodes it."""
    import os
    from conftest import ROOT
    from idfusion_pack.idfusion import synthetic
    patcher, clip, codec, _ = synthetic.load(os.path.join(ROOT, "models", "synthetic_faces.safetensors"))
    side = 8 * 129  # a 129x129 latent with the model's codec (8 px per latent position)
    with interrupt_set(), pytest.raises(AdapterError, match=r"1032x1032 px, a 129x129 latent.*16384 positions"):
        node("IDFusionEncodeReference", patcher, codec, torch.zeros(1, side, side, 3), 0, "big")
    assert MAX_LATENT_TOKENS == 128 * 128


def test_apply_refuses_an_identity_beyond_the_bound_before_its_reference_pass(model, adapter):
    """An identity that never went through the file loader's bound (built in Python, or by another pack's node) with a
    129x129 latent: Apply refuses it before its reference pass (check_reference_pass). Without that check nothing
    else stops it: removing it was not seen by any test before (issue 18, round three)."""
    from helpers import random_identity
    ident = random_identity(model)
    ident.h_f, ident.latents = [None], [torch.zeros(1, 4, 129, 129)]
    with interrupt_set():
        msg = _apply_error(model, adapter, ident)
    assert "129x129" in msg and "more than the 16384 positions" in msg, msg


def test_a_large_reference_pass_in_query_chunks_records_the_same_h_f(model):
    """Past a 64x64 latent the pass computes attn1 in query chunks (so Cancel is seen about every second); each query's
    softmax still covers every key, so h_f matches ComfyUI's own unchunked attention."""
    from idfusion_pack.idfusion import identity as I
    from idfusion_pack.idfusion.adapter import find_layers
    latent = torch.randn(1, 4, 72, 72, generator=torch.Generator().manual_seed(0))
    sigma, ctx = I.reference_sigma(model, 0), torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    calls = []
    chunked = I._ChunkedAttn1.__call__
    with torch.inference_mode():
        I._ChunkedAttn1.__call__ = lambda self, q, k, v, extra: calls.append(q.shape[1]) or chunked(self, q, k, v, extra)
        try:
            got = I.run_reference_pass(model.model, torch.device("cpu"), latent, sigma, ctx)
        finally:
            I._ChunkedAttn1.__call__ = chunked
        recorder = I._Recorder()  # the plain pass: ComfyUI's attention, no replace patch
        model.model.apply_model(latent, sigma, c_crossattn=ctx, transformer_options={"patches": {"attn2_patch": [recorder]}})
    assert 72 * 72 in calls and max(calls) * 72 * 72 > I.CHUNK_LOGITS  # the top layers did go through in chunks
    assert set(got) == {l.key for l in find_layers(model.model.diffusion_model)}
    for key, h in recorder.h_f.items():
        torch.testing.assert_close(got[key], h, rtol=1e-4, atol=1e-5)


def test_a_running_reference_pass_stops_promptly_on_interrupt(model):
    """ComfyUI's Cancel sets a flag that the sampler reads between steps; the reference pass (inside Apply, before any
    step) now reads it at every attn2 layer and every attn1 query chunk. A 96x96 pass takes ~2 min here; it must end
    within seconds."""
    import comfy.model_management as mm
    from idfusion_pack.idfusion.identity import reference_h_f, reference_sigma
    from idfusion_pack.idfusion.adapter import find_layers
    layers = find_layers(model.model.diffusion_model)
    latent = torch.randn(1, 4, 96, 96)
    sigma = reference_sigma(model, 0)
    timer = threading.Timer(1.0, mm.interrupt_current_processing, (True,))
    start = time.perf_counter()
    timer.start()
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            reference_h_f(model, layers, latent, sigma, torch.zeros(1, 77, 768))
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    took = time.perf_counter() - start
    print(f"interrupted reference pass ended {took:.1f} s after it started (interrupt at 1.0 s)")
    assert took < 15, took


# ---- Apply / Train numbers: non-finite and absurd values refused by the node ---------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_APPLY = {
    "weight NaN (an all-black image)": (dict(weight=NAN), "weight is nan, not a finite number"),
    "weight inf": (dict(weight=INF), "weight is inf"),
    "weight beyond max": (dict(weight=50.0), "weight is 50, outside its range"),
    "start_at NaN (IndexError)": (dict(start_at=NAN), "start_at is nan"),
    "end_at NaN (IndexError)": (dict(end_at=NAN), "end_at is nan"),
    "end_at -inf": (dict(end_at=-INF), "end_at is -inf"),
    "block_weights 1e300 (an all-black image)": (dict(block_weights="input:1e300"), "block_weights: 'input:1e300'.*at most 10"),
    "block_weights 5000-digit index": (dict(block_weights="1" * 5000 + ":1"), "layer index 111111111111... .*out of range"),
    "block_weights non-ascii digit": (dict(block_weights="²:1"), "unknown group '²'"),
    "block_weights inf": (dict(block_weights="output:inf"), "block_weights: 'output:inf'"),
    "reference_tokens unknown": (dict(reference_tokens="some"), "reference_tokens is 'some'"),
}


@pytest.mark.parametrize("case", list(BAD_APPLY))
def test_apply_refuses_non_finite_and_absurd_numbers_naming_the_input(case, model, adapter):
    from helpers import random_identity
    change, message = BAD_APPLY[case]
    args = {**dict(weight=1.0, start_at=0.0, end_at=1.0, uncond="text only", mode="cached"), **change}
    ident = random_identity(model)
    before = dict(model.model_options.get("transformer_options", {}))
    with pytest.raises(ValueError, match=message):
        node("IDFusionApply", model, adapter, ident, **args)
    with pytest.raises(ValueError, match=message):  # the Multi-Identity node shares the checks
        node("IDFusionApplyMultiIdentity", model, adapter, torch.ones(1, 8, 8), identity_1=ident, **args)
    assert model.model_options.get("transformer_options", {}) == before


FACE_RUNS = {  # node -> (FUNCTION's arguments after face_analysis/image, the bad input); run with linked values
    "IDFusionFaceCrop": (dict(order="largest", index=0, size=64, margin=NAN, no_face="error"), "margin is nan"),
    "IDFusionFaceMasks": (dict(identities=1, order="largest", margin=NAN, feather=8), "margin is nan"),
    "IDFusionFaceCropForRepaint": (dict(order="largest", index=0, context=INF, size=64, mask_margin=0.15, feather=16,
                                        no_face="error"), "context is inf"),
    "IDFusionFaceEvaluate": (dict(size=64, margin=NAN), "margin is nan"),
}


@pytest.mark.parametrize("name", FACE_RUNS)
def test_face_nodes_refuse_a_linked_nan_when_they_run(name):
    """A linked value (a math node's output) reaches the node without VALIDATE_INPUTS: the node checks again when it
    runs. Without that check (tried): Face Crop and Face Evaluate ran on with margin NaN and raised nothing, Face
    Masks raised a raw 'cannot convert float NaN to integer', the repaint crop a raw OverflowError for context inf.
    Through a server: tests/test_hostile_server.py."""
    from skimage import data
    from idfusion_pack.idfusion import faces as F
    img = torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]
    kwargs, message = FACE_RUNS[name]
    haar = F.load_haar()
    args = {"IDFusionFaceMasks": (img,), "IDFusionFaceEvaluate": (haar, img, img)}.get(name, (haar, img))
    if name == "IDFusionFaceMasks":
        kwargs = {**kwargs, "face_analysis": haar}
    with pytest.raises(ValueError, match=message):
        node(name, *args, **kwargs)
    assert NODES[name].VALIDATE_INPUTS() is True  # linked inputs are not given at validation time


def test_validate_inputs_refuses_nan_before_the_prompt_runs_and_accepts_the_pooled_alias():
    """ComfyUI calls VALIDATE_INPUTS when the prompt is queued; listing an input there turns off its own min/max and
    choice checks, so ours repeats them. (Through a real server: tests/test_hostile_server.py.)"""
    for cls in (NODES["IDFusionApply"], NODES["IDFusionApplyMultiIdentity"]):
        ok = dict(weight=1.0, start_at=0.0, end_at=1.0, reference_tokens="all")
        assert cls.VALIDATE_INPUTS(**ok) is True
        assert cls.VALIDATE_INPUTS(**{**ok, "reference_tokens": "pooled"}) is True
        assert cls.VALIDATE_INPUTS() is True  # linked inputs are not given at validation time
        for bad in (dict(weight=NAN), dict(start_at=NAN), dict(end_at=INF), dict(weight=-1.0), dict(weight=True),
                    dict(reference_tokens="some")):
            assert isinstance(cls.VALIDATE_INPUTS(**{**ok, **bad}), str), bad
    train = NODES["IDFusionTrainAdapter"]
    assert train.VALIDATE_INPUTS(learning_rate=1e-4, reference_dropout=0.1, face_loss_weight=0.0, cgdr_weight=0.0) is True
    assert "learning_rate is nan" in train.VALIDATE_INPUTS(learning_rate=NAN)
    assert "cgdr_weight is inf" in train.VALIDATE_INPUTS(cgdr_weight=INF)


def test_the_pooled_alias_applies_like_its_label(model, adapter):
    from helpers import random_identity
    from idfusion_pack.nodes.apply_nodes import POOLED
    ident = random_identity(model)
    a = node("IDFusionApply", model, adapter, ident, 1.0, 0.0, 1.0, "text only", "cached", reference_tokens="pooled")[0]
    b = node("IDFusionApply", model, adapter, ident, 1.0, 0.0, 1.0, "text only", "cached", reference_tokens=POOLED)[0]
    from idfusion_pack.idfusion.patch import ours
    assert {p.fusions[0].reference_tokens for p in ours(a)} == {p.fusions[0].reference_tokens for p in ours(b)} == {"pooled"}


# ---- training images: every Pillow mode at its true tone, skipped files on the node ----------------------------
def _modes(folder):
    """(file, expected mean of the 8-bit RGB the dataset must give), one per Pillow mode a user's file may open as."""
    grey16 = np.full((64, 64), 32896, np.uint16)  # 32896 / 257 = 128
    Image.fromarray(grey16).save(folder / "grey16.png")  # opens as I;16
    Image.fromarray(np.full((64, 64), 128 * 257, np.int32), "I").save(folder / "grey32.tif")
    Image.fromarray(np.full((64, 64), 0.5, np.float32), "F").save(folder / "float.tiff")
    Image.new("LA", (64, 64), (128, 255)).save(folder / "grey_alpha.png")
    palette = Image.new("P", (64, 64), 3)
    palette.putpalette([0, 0, 0] * 3 + [100, 150, 200] + [0, 0, 0] * 252)
    palette.save(folder / "palette.png")
    Image.new("CMYK", (64, 64), (0, 0, 0, 127)).save(folder / "cmyk.jpg", quality=100)
    Image.new("1", (64, 64), 1).save(folder / "bilevel.bmp")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "rgb.webp", lossless=True)
    return {"grey16.png": 128, "grey32.tif": 128, "float.tiff": 127.5, "grey_alpha.png": 128,
            "palette.png": 150, "cmyk.jpg": 128, "bilevel.bmp": 255, "rgb.webp": 128}


def test_16_bit_and_other_image_modes_train_at_their_true_tone(tmp_path, monkeypatch):
    """A 16-bit greyscale PNG (mode I;16) trained as a near-white image: mean 254.5, 99.6% of pixels 255."""
    from idfusion_pack.idfusion import dataset
    monkeypatch.setattr(dataset, "IMAGE_EXTS", dataset.IMAGE_EXTS | {".tif", ".tiff"})  # 32-bit int and float files
    expected = _modes(tmp_path)
    ds = FaceDataset(str(tmp_path), 32)
    assert not ds.skipped, ds.skip_reasons
    means = {s.image.split("/")[-1]: float(ds.load(i, torch.Generator().manual_seed(0))["image"].mean() * 255)
             for i, s in enumerate(ds.samples)}
    print(means)
    for name, want in expected.items():
        assert abs(means[name] - want) <= 1.5, (name, means[name], want)


def _png_header_only(path, width, height):
    """A PNG whose IHDR declares width x height: Pillow decides on the header, as it would for a real bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def bad_files(folder):
    (folder / "ann" / "fake.png").write_bytes(b"GIF89a this is not a png")
    _png_header_only(folder / "ann" / "bomb.png", 20000, 20000)       # 400 M pixels: Pillow's own bomb error
    _png_header_only(folder / "bob" / "huge.png", 9000, 9000)         # 81 M: only a warning from Pillow, refused here
    data = (folder / "bob" / "bob1.png").read_bytes()
    (folder / "bob" / "truncated.png").write_bytes(data[: len(data) // 2])
    return {"ann/broken.png": "not a readable image", "ann/fake.png": "not a readable image",
            "ann/bomb.png": "decompression bomb", "bob/huge.png": "more than the", "bob/truncated.png": ""}


def test_dataset_says_why_each_file_was_skipped(tmp_path):
    make_face_dataset(tmp_path)
    expected = bad_files(tmp_path)
    ds = FaceDataset(str(tmp_path), 64)
    report = ds.skipped_report()
    print("\n".join(report))
    assert len(ds) == 4 and len(report) == len(expected)
    for name, why in expected.items():
        assert any(line.startswith(name + ": ") and why in line for line in report), (name, report)
    assert MAX_PIXELS < 9000 * 9000 < Image.MAX_IMAGE_PIXELS * 2


def test_train_node_reports_skipped_files_in_its_output(tmp_path, idfusion_dir, monkeypatch):
    """Skipped files were only on the console: now in the node's ui text (shown in the history, for API users too)
    and as progress text on the node while it trains."""
    import folder_paths
    import random_models
    inp = tmp_path / "input"
    root = inp / "idfusion_datasets" / "faces"
    root.mkdir(parents=True)
    make_face_dataset(root)
    expected = bad_files(root)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp))
    args = dict(model=small_unet(seed=1), clip=random_models.build_clip(seed=4), vae=random_models.build_vae(seed=5),
                dataset="faces", adapter_name="skips", steps=1, batch_size=1, learning_rate=1e-4, resolution=64,
                save_every=1, seed=0, init="zeros", reference="same image", reference_dropout=0.0, face_loss_weight=0.0,
                cgdr_weight=0.0, class_prompt="a photo of a person", encoding="cached", resume=False)
    with torch.inference_mode():
        out = NODES["IDFusionTrainAdapter"]().train(**args)
    text = out["ui"]["text"]
    assert text[1] == f"skipped {len(expected)} of {len(expected) + 4} files in 'faces':", text
    for name in expected:
        assert any(line.startswith(name + ": ") for line in text[2:]), (name, text)
    assert len(out["ui"]["idfusion_skipped"]) == len(expected)
    with pytest.raises(ValueError, match="learning_rate is nan"):
        with torch.inference_mode():
            NODES["IDFusionTrainAdapter"]().train(**{**args, "learning_rate": NAN})
