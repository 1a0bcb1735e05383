"""The IDFusion adapter: Linear_kf and Linear_vf for every cross-attention (attn2) layer of a UNet,
and its .safetensors file format.

Layers are found by walking the model's own modules, so any UNet built from ComfyUI's
BasicTransformerBlock works (SD1.5: 16 layers, SDXL: 70) without a list of block ids.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

FORMAT_VERSION = 1
ADAPTER_FORMAT = "idfusion.adapter"

# ComfyUI's UNetModel.forward names its blocks ("input", i), ("middle", 0), ("output", i) in
# transformer_options["block"]; attn2 replace patches are keyed by (block, number, transformer index).
_BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_ATTN2 = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:.*\.)?transformer_blocks\.(\d+)\.attn2$")


class AdapterError(ValueError):
    """An adapter or identity that does not fit the model, or a file that is not one."""


@dataclass(frozen=True)
class Layer:
    """One attn2 layer: its patch key, the width of h_f (channels) and of K/V (inner), and its heads."""
    key: tuple  # (block, number, transformer_index)
    channels: int
    inner: int
    heads: int

    @property
    def name(self) -> str:  # safe as a tensor-name prefix and nn.ModuleDict key
        return "{}_{}_{}".format(*self.key)

    def to_json(self):
        return {"key": list(self.key), "channels": self.channels, "inner": self.inner, "heads": self.heads}

    @staticmethod
    def from_json(d):
        b, n, i = d["key"]
        return Layer((str(b), int(n), int(i)), int(d["channels"]), int(d["inner"]), int(d["heads"]))


def find_layers(diffusion_model: nn.Module) -> list[Layer]:
    """Every attn2 layer of a UNet, in forward order (input, middle, output)."""
    order = {"input": 0, "middle": 1, "output": 2}
    layers = []
    for name, module in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m is None or module is None:
            continue
        block = _BLOCK_NAMES[m.group(1)]
        number = 0 if block == "middle" else int(m.group(2))
        layers.append(Layer((block, number, int(m.group(3))), module.to_q.in_features,
                            module.to_k.out_features, module.heads))
    layers.sort(key=lambda l: (order[l.key[0]], l.key[1], l.key[2]))
    return layers


def attn2_modules(diffusion_model: nn.Module) -> dict:
    """key -> the attn2 module, for initialising from attn1 and for tests."""
    out = {}
    for name, module in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m and module is not None:
            block = _BLOCK_NAMES[m.group(1)]
            out[(block, 0 if block == "middle" else int(m.group(2)), int(m.group(3)))] = (name, module)
    return out


def model_family(model_patcher) -> str:
    """The base family as ComfyUI detected it (SD15, SDXL, ...): the model config's class name."""
    cfg = getattr(model_patcher.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model_patcher.model).__name__


class IDFusionAdapter(nn.Module):
    """Linear_kf and Linear_vf (channels -> inner, no bias, like attn2's own to_k/to_v) per attn2 layer."""

    def __init__(self, layers: list[Layer], family: str = "unknown", encoding: dict | None = None):
        super().__init__()
        self.layers = list(layers)
        self.family = family
        # how references were encoded in training; the encoder defaults to the same
        self.encoding = dict(encoding or {"mode": "cached", "timestep": 0, "text": "zeros"})
        self.to_k_f = nn.ModuleDict({l.name: nn.Linear(l.channels, l.inner, bias=False) for l in self.layers})
        self.to_v_f = nn.ModuleDict({l.name: nn.Linear(l.channels, l.inner, bias=False) for l in self.layers})

    @classmethod
    def fresh(cls, model_patcher, init: str = "zeros", seed: int = 0, encoding: dict | None = None):
        """A new adapter shaped for `model_patcher`, for training.

        init: "zeros" (K_f = V_f = 0: identity keys take a little attention mass but add nothing),
        "attn1" (copy each block's self-attention to_k/to_v, which already read h_f's feature space),
        "random" (PyTorch's default Linear init, seeded)."""
        diffusion_model = model_patcher.model.diffusion_model
        layers = find_layers(diffusion_model)
        if not layers:
            raise AdapterError("The model has no cross-attention (attn2) layers; IDFusion needs a UNet with text cross-attention.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = cls(layers, model_family(model_patcher), encoding)
        if init == "zeros":
            for p in adapter.parameters():
                nn.init.zeros_(p)
        elif init == "attn1":
            modules = attn2_modules(diffusion_model)
            blocks = dict(diffusion_model.named_modules())
            for l in layers:
                attn1 = blocks[modules[l.key][0][:-len("attn2")] + "attn1"]
                with torch.no_grad():
                    adapter.to_k_f[l.name].weight.copy_(attn1.to_k.weight.float())
                    adapter.to_v_f[l.name].weight.copy_(attn1.to_v.weight.float())
        elif init != "random":
            raise AdapterError(f"init must be 'zeros', 'attn1' or 'random', not {init!r}.")
        return adapter

    def weights(self, layer: Layer):
        return self.to_k_f[layer.name].weight, self.to_v_f[layer.name].weight

    def describe(self) -> str:
        return f"{self.family} ({len(self.layers)} layers)"

    def check_model(self, model_patcher, what: str = "Adapter"):
        """Raise a clear AdapterError unless this adapter's layers are exactly the model's."""
        check_layers(self.layers, self.family, model_patcher, what)

    # ---- file format -------------------------------------------------------------------------
    def state_tensors(self) -> dict:
        out = {}
        for l in self.layers:
            prefix = ".".join(str(x) for x in l.key)
            out[f"{prefix}.to_k_f.weight"] = self.to_k_f[l.name].weight.detach().contiguous()
            out[f"{prefix}.to_v_f.weight"] = self.to_v_f[l.name].weight.detach().contiguous()
        return out

    def metadata(self) -> dict:
        return {"format": ADAPTER_FORMAT, "format_version": str(FORMAT_VERSION), "base_family": self.family,
                "layers": json.dumps([l.to_json() for l in self.layers]),
                "reference_encoding": json.dumps(self.encoding)}

    def save(self, path: str, dtype: torch.dtype | None = None):
        tensors = self.state_tensors()
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        save_safetensors_atomic(tensors, path, self.metadata())

    @classmethod
    def load(cls, path: str):
        """Read and check an adapter file. Everything the file declares is checked against its tensor headers before
        any weight is read or allocated, and every weight must be finite and of a plausible size."""
        name = os.path.basename(path)
        bad = FileProblem("Adapter", name, "re-export or re-train it, or remove it from models/idfusion")
        shapes, meta = read_header(path, ADAPTER_FORMAT, "adapter")
        layers = bad.check(parse_layers, meta.get("layers"))
        encoding = bad.check(parse_encoding, meta.get("reference_encoding"), "reference_encoding", optional=True)
        family = bad.check(parse_family, meta.get("base_family"))
        expected = {}
        for l in layers:
            prefix = ".".join(str(x) for x in l.key)
            for part in ("to_k_f", "to_v_f"):
                expected[f"{prefix}.{part}.weight"] = ((l.inner, l.channels), FLOAT_DTYPES)
        bad.check(check_tensor_headers, shapes, expected)
        # only now, with every size known to match bytes that are in the file, allocate (on "meta": no init)
        with torch.device("meta"):
            adapter = cls(layers, family, encoding)
        for tname, t in read_tensors(path, list(expected), "adapter"):
            bad.check(check_values, tname, t, MAX_WEIGHT, "weight")
            block, number, index, part = tname.split(".")[:4]
            table = adapter.to_k_f if part == "to_k_f" else adapter.to_v_f
            table[f"{block}_{number}_{index}"].weight = nn.Parameter(t.float())
        return adapter


def check_layers(layers: list[Layer], family: str, model_patcher, what: str, label: str = ""):
    model_layers = find_layers(model_patcher.model.diffusion_model)
    if layers == model_layers:
        return
    model_fam = model_family(model_patcher)
    label = f" {label}" if label else ""  # already quoted by the caller (an identity's name and file)
    if len(layers) != len(model_layers):
        raise AdapterError(f"{what}{label} was made for {family} ({len(layers)} layers) but the model is {model_fam} "
                           f"({len(model_layers)} layers): pick a {model_fam} {what.lower()} or a {family} checkpoint.")
    bad = next(a for a, b in zip(layers, model_layers) if a != b)
    raise AdapterError(f"{what}{label} was made for {family} but does not fit this {model_fam} model: layer {bad.key} "
                       f"has {bad.channels}->{bad.inner} channels in the file. Pick a {what.lower()} made for this model family.")


# ---- safetensors helpers (never pickle) ---------------------------------------------------------
def save_safetensors_atomic(tensors: dict, path: str, metadata: dict):
    """Write to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    from safetensors.torch import save_file
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        # clone: references may share storage (a merged identity), which safetensors refuses to write
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors(path: str, expected_format: str, what: str):
    """All tensors and the metadata of a small IDFusion file (training state, synthetic model); the format tag and
    version are checked. Adapters and identities use read_header first, to check sizes before reading."""
    read_header(path, expected_format, what)
    return dict(read_tensors(path, None, what)), _open(path, what, lambda f: f.metadata() or {})


def recommended_settings(path: str) -> dict:
    """The sampling settings an adapter file recommends: its "recommended" metadata, which `make synthetic` writes
    from its validation sweep. -> {"cfg", "uncond", "weight", "end_at"} (end_at 1.0 where a file names none)."""
    name = os.path.basename(path)
    raw = _open(path, "IDFusion adapter", lambda f: (f.metadata() or {}).get("recommended"))
    try:
        rec = json.loads(raw) if isinstance(raw, str) and len(raw) <= MAX_META_FIELD else None
        out = {"cfg": float(rec["cfg"]), "uncond": str(rec["uncond"]), "weight": float(rec["weight"]),
               "end_at": float(rec.get("end_at", 1.0))}
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError):   # RecursionError: '[[[[...' nested
        out = None
    if out is None or out["uncond"] not in ("text only", "identity too") or not (
            0 < out["cfg"] <= 100 and 0 <= out["weight"] <= 10 and 0 < out["end_at"] <= 1):
        raise AdapterError(f"The adapter file '{name}' has no usable 'recommended' settings (cfg, uncond, weight, "
                           f"end_at) in its metadata; rebuild it with `make synthetic`.")
    return out


# ---- checking files before trusting them ------------------------------------------------------------
MAX_WEIGHT = 1e4         # trained Linear_kf/Linear_vf weights are O(0.01..1); far beyond this means a broken file
MAX_DIM = 1 << 16        # widest channel count accepted in metadata (SDXL's is 1280)
MAX_LAYERS = 1024        # SDXL has 70 attn2 layers
MAX_META_FIELD = 1 << 20  # one JSON metadata entry, in characters (SDXL's 70-layer list is ~6 KB)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_BLOCKS = ("input", "middle", "output", "double", "single")  # UNet attn2 layers; Flux DiT blocks (patch_flux.py)


class _Bad(Exception):
    """One thing wrong in a file; FileProblem turns it into an AdapterError that names the file."""


class FileProblem:
    def __init__(self, what: str, name: str, fix: str):
        self.what, self.name, self.fix = what, name, fix

    def error(self, detail: str) -> AdapterError:
        return AdapterError(f"{self.what} file '{self.name}' is damaged or was not written by IDFusion: {detail}. "
                            f"{self.fix[:1].upper()}{self.fix[1:]}.")

    def check(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _Bad as e:
            raise self.error(str(e)) from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_field(text, field: str, optional: bool = False):
    if text is None:
        if optional:
            return None
        raise _Bad(f"its metadata has no '{field}' entry")
    if not isinstance(text, str) or len(text) > MAX_META_FIELD:
        raise _Bad(f"its '{field}' metadata is not a JSON text of at most {MAX_META_FIELD} characters")
    try:
        return json.loads(text)
    except RecursionError:  # json.loads recurses once per level: '[[[[...' 100000 deep
        raise _Bad(f"its '{field}' metadata is JSON nested too deep") from None
    except (TypeError, ValueError) as e:
        raise _Bad(f"its '{field}' metadata is not valid JSON ({str(e)[:200]})") from None


def parse_layers(text) -> list[Layer]:
    items = _json_field(text, "layers")
    if not isinstance(items, list) or not items:
        raise _Bad("its 'layers' metadata must be a non-empty JSON list")
    if len(items) > MAX_LAYERS:
        raise _Bad(f"it declares {len(items)} layers (more than {MAX_LAYERS})")
    layers, seen = [], set()
    for i, d in enumerate(items):
        if not isinstance(d, dict) or not {"key", "channels", "inner", "heads"} <= set(d):
            raise _Bad(f"layer {i} in 'layers' must be an object with key, channels, inner and heads")
        key = d["key"]
        if not (isinstance(key, list) and len(key) == 3 and key[0] in _BLOCKS and _is_int(key[1]) and _is_int(key[2])
                and 0 <= key[1] < 1000 and 0 <= key[2] < 1000):
            raise _Bad(f"layer {i} has key {key!r}; expected [input|middle|output, block number, transformer index] or [double|single, block number, 0]")
        for f in ("channels", "inner", "heads"):
            if not _is_int(d[f]) or not 1 <= d[f] <= MAX_DIM:
                raise _Bad(f"layer {key} has {f}={d[f]!r}; expected a whole number from 1 to {MAX_DIM}")
        if d["inner"] % d["heads"]:
            raise _Bad(f"layer {key} has inner={d['inner']} which is not divisible by heads={d['heads']}")
        if tuple(key) in seen:
            raise _Bad(f"layer {key} is listed twice")
        seen.add(tuple(key))
        layers.append(Layer(tuple(key), d["channels"], d["inner"], d["heads"]))
    return layers


def parse_encoding(text, field: str, optional: bool = False) -> dict | None:
    enc = _json_field(text, field, optional)
    if enc is None:
        return None
    if not isinstance(enc, dict):
        raise _Bad(f"its '{field}' metadata must be a JSON object")
    enc = {"mode": "cached", "timestep": 0, "text": "zeros", **enc}
    if enc["mode"] not in ("cached", "per_step") or enc["text"] not in ("zeros", "empty") \
            or not _is_int(enc["timestep"]) or not 0 <= enc["timestep"] <= 999:
        raise _Bad(f"its '{field}' metadata {json.dumps(enc)} needs mode cached|per_step, timestep 0..999 and text zeros|empty")
    return enc


def parse_family(text) -> str:
    if text is None:
        return "unknown"
    if len(text) > 64 or not text.isprintable():
        raise _Bad("its 'base_family' metadata is not a model family name")
    return text


def check_tensor_headers(shapes: dict, expected: dict, optional: dict | None = None):
    """shapes: name -> (shape, dtype) from the file header. expected / optional: name -> (want, dtypes), where want
    is the exact shape, or a function(shape) returning what is wrong with it (None when fine)."""
    optional = optional or {}
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise _Bad(f"tensor '{missing[0]}' is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(k for k in shapes if k not in expected and k not in optional)
    if extra:
        raise _Bad(f"it has unexpected tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, (want, dtypes) in {**expected, **optional}.items():
        if k not in shapes:
            continue
        shape, dtype = shapes[k]
        if dtype not in dtypes:
            raise _Bad(f"tensor '{k}' has dtype {dtype}; expected {' or '.join(sorted(dtypes))}")
        problem = want(shape) if callable(want) else (None if shape == tuple(want) else f"expected {tuple(want)}")
        if problem:
            raise _Bad(f"tensor '{k}' has shape {shape}: {problem}")


def check_values(name: str, t: torch.Tensor, limit: float, kind: str = "value"):
    if not t.is_floating_point():
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise _Bad(f"tensor '{name}' has {int((~finite).sum())} NaN or infinite {kind}s")
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > limit:
        raise _Bad(f"tensor '{name}' has {kind}s up to {peak:.3g}, beyond the plausible {limit:g}")


def _open(path: str, what: str, fn):
    from safetensors import safe_open
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return fn(f)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and truncated files
        raise AdapterError(f"The {what} file '{name}' could not be read as safetensors ({e}); it is damaged, truncated or "
                           f"not a safetensors file. Replace it with a complete copy.") from e


def read_header(path: str, expected_format: str, what: str, newest: int = FORMAT_VERSION):
    """(name -> (shape, dtype), metadata) from the file header only: nothing is allocated for tensor data. safetensors
    itself checks that every declared tensor lies inside the file, so the shapes bound what a later read allocates."""
    name = os.path.basename(path)
    if not name.lower().endswith(".safetensors"):
        raise AdapterError(f"The {what} file '{name}' is not a .safetensors file. IDFusion only reads safetensors "
                           f"(pickled .pt/.ckpt/.bin files can run code when loaded); convert it to .safetensors.")

    def header(f):
        shapes = {}
        for k in f.keys():
            sl = f.get_slice(k)
            shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return shapes, f.metadata() or {}

    shapes, meta = _open(path, what, header)
    fmt = meta.get("format")
    if fmt != expected_format:
        raise AdapterError(f"'{name}' is not an IDFusion {what} file (its metadata says format={fmt!r}, expected "
                           f"{expected_format!r}). Put IDFusion {what} files in "
                           f"{'models/idfusion/identities' if what == 'identity' else 'models/idfusion'}.")
    version = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", version) or int(version) < 1:
        raise AdapterError(f"The {what} file '{name}' has format_version {version!r}, not a version number; it is damaged. "
                           f"Replace it with a file written by IDFusion.")
    if int(version) > newest:
        raise AdapterError(f"'{name}' uses {what} format version {version}, newer than this pack "
                           f"understands ({newest}); update ComfyUI-IDFusion.")
    return shapes, meta


def read_tensors(path: str, names, what: str):
    """(name, tensor) for the named tensors (None: all), read one at a time."""
    return _open(path, what, lambda f: [(k, f.get_tensor(k)) for k in (f.keys() if names is None else names)])
