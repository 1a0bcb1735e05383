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
        tensors, meta = read_safetensors(path, ADAPTER_FORMAT, "adapter")
        layers = [Layer.from_json(d) for d in json.loads(meta["layers"])]
        adapter = cls(layers, meta.get("base_family", "unknown"), json.loads(meta.get("reference_encoding", "{}")) or None)
        name = os.path.basename(path)
        for l in layers:
            prefix = ".".join(str(x) for x in l.key)
            for part, table in (("to_k_f", adapter.to_k_f), ("to_v_f", adapter.to_v_f)):
                t = tensors.get(f"{prefix}.{part}.weight")
                if t is None:
                    raise AdapterError(f"Adapter '{name}' lists layer {l.key} but has no tensor '{prefix}.{part}.weight': the file is incomplete; re-export it.")
                if tuple(t.shape) != (l.inner, l.channels):
                    raise AdapterError(f"Adapter '{name}': tensor '{prefix}.{part}.weight' has shape {tuple(t.shape)}, "
                                       f"expected {(l.inner, l.channels)} for that layer; the file is damaged or from another tool.")
                with torch.no_grad():
                    table[l.name].weight.copy_(t.float())
        return adapter


def check_layers(layers: list[Layer], family: str, model_patcher, what: str, label: str = ""):
    model_layers = find_layers(model_patcher.model.diffusion_model)
    if layers == model_layers:
        return
    model_fam = model_family(model_patcher)
    label = f" '{label}'" if label else ""
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
    from safetensors import safe_open
    name = os.path.basename(path)
    if not name.lower().endswith(".safetensors"):
        raise AdapterError(f"The {what} file '{name}' is not a .safetensors file. IDFusion only reads safetensors "
                           f"(pickled .pt/.ckpt/.bin files can run code when loaded); convert it to .safetensors.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise AdapterError(f"The {what} file '{name}' could not be read as safetensors ({e}); it is damaged or not a safetensors file.") from e
    fmt = meta.get("format")
    if fmt != expected_format:
        raise AdapterError(f"'{name}' is not an IDFusion {what} file (its metadata says format={fmt!r}, expected "
                           f"{expected_format!r}). Put IDFusion {what} files in models/idfusion.")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise AdapterError(f"'{name}' uses {what} format version {meta['format_version']}, newer than this pack "
                           f"understands ({FORMAT_VERSION}); update ComfyUI-IDFusion.")
    return tensors, meta
