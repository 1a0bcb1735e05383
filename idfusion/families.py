"""The one interface the nodes call, per model family: which glue module patches this model.

- UNet (SD1.5, SDXL, ...: attn2 cross-attention layers): patch.py + identity.py.
- Flux DiT (comfy.ldm.flux.model.Flux: Flux dev/schnell/Kontext/Fill, Flux 2): patch_flux.py.

Each glue offers the same names: family, find_layers, check_adapter, check_identity, fresh_adapter, encode_identity, identity_for_model,
Fusion, install, missing_hooks; and for the one Trainer (train.py): text_condition, reference_sigma, run_reference_pass
(h_f of a batch of references), train_sigma (a 0..999 draw on the model's noise schedule), target_kwargs (the target
forward's extra inputs), train_options (the training forward's fused attention, with gradients) and trainable (a
clone the trainer can back-propagate through)."""
from __future__ import annotations

from types import SimpleNamespace

from . import identity, patch, patch_flux, train
from .adapter import IDFusionAdapter, find_layers as unet_layers
from .identity import encode_identity as unet_encode


UNET = SimpleNamespace(
    family="UNet",
    find_layers=unet_layers,
    check_adapter=lambda adapter, model_patcher: adapter.check_model(model_patcher),
    check_identity=lambda identity, model_patcher, mode=None: identity.check_model(model_patcher, mode),
    fresh_adapter=IDFusionAdapter.fresh,
    encode_identity=unet_encode,
    identity_for_model=lambda identity, model_patcher: identity.for_model(model_patcher),
    Fusion=patch.Fusion,
    install=patch.install,
    missing_hooks=lambda: None,
    text_condition=identity.text_condition,
    reference_sigma=identity.reference_sigma,
    run_reference_pass=identity.run_reference_pass,
    train_sigma=train.unet_train_sigma,
    target_kwargs=train.unet_target_kwargs,
    train_options=train.unet_train_options,
    trainable=train.unet_trainable,
)

FLUX = SimpleNamespace(
    family="Flux",
    find_layers=patch_flux.find_layers,
    check_adapter=patch_flux.check_adapter,
    check_identity=patch_flux.check_identity,
    fresh_adapter=patch_flux.fresh_adapter,
    encode_identity=patch_flux.encode_identity,
    identity_for_model=patch_flux.identity_for_model,
    Fusion=patch_flux.FluxFusion,
    install=patch_flux.install,
    missing_hooks=patch_flux.missing_hooks,
    text_condition=patch_flux.text_condition,
    reference_sigma=patch_flux.reference_sigma,
    run_reference_pass=patch_flux.run_reference_pass,
    train_sigma=patch_flux.train_sigma,
    target_kwargs=patch_flux.target_kwargs,
    train_options=patch_flux.train_options,
    trainable=patch_flux.trainable,
)


def glue_for(model_patcher):
    """The glue for this MODEL: Flux for ComfyUI's Flux DiT class, else the UNet glue (which reports clearly when a
    model has no attn2 layers)."""
    return FLUX if patch_flux.is_flux(model_patcher) else UNET
