"""Adapter nodes: load an adapter file, or create a fresh one shaped for a model (for training)."""
from ..idfusion.adapter import IDFusionAdapter
from ..idfusion.families import glue_for
from .common import CATEGORY, adapter_files, full_path


class IDFusionAdapterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"adapter_name": (adapter_files(), {
            "tooltip": "An IDFusion adapter (.safetensors) from models/idfusion: Linear_kf/Linear_vf for every cross-attention layer."})}}

    RETURN_TYPES = ("IDFUSION_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The adapter; connect it to IDFusion Apply.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an IDFusion adapter. Only .safetensors files are read; the model family is checked when applied."

    def load(self, adapter_name):
        return (IDFusionAdapter.load(full_path("Adapter", adapter_name)),)


class IDFusionNewAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the adapter is shaped for: one Linear_kf/Linear_vf pair per attn2 layer (UNet) or per double/single block (Flux DiT), read off this model."}),
            "init": (["zeros", "attn1", "random"], {"default": "attn1", "tooltip":
                     "zeros: identity keys add nothing until trained. attn1: copy each block's self-attention key/value "
                     "projections (a warm start). random: PyTorch's default init (only for testing the pipeline)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed for the random init."}),
        }}

    RETURN_TYPES = ("IDFUSION_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("A new, untrained adapter for this model (the starting point for training).",)
    FUNCTION = "create"
    CATEGORY = CATEGORY
    DESCRIPTION = "Creates an untrained IDFusion adapter for the model. No public adapter exists yet; train one, or use this to try the pipeline."

    def create(self, model, init, seed):
        return (glue_for(model).fresh_adapter(model, init=init, seed=seed),)  # UNet or Flux DiT


NODE_CLASS_MAPPINGS = {"IDFusionAdapterLoader": IDFusionAdapterLoader, "IDFusionNewAdapter": IDFusionNewAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionAdapterLoader": "IDFusion Load Adapter",
                              "IDFusionNewAdapter": "IDFusion New Adapter (untrained)"}
