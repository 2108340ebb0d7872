"""Fold adapters into the base weights and unload them (several adapters combine in lora/weighted.py)."""

from __future__ import annotations

from torch import nn

from lorakit.lora.adapters import lora_layers, saved_modules
from lorakit.lora.base import dequantize_model, is_quantized
from lorakit.lora.fused_siblings import unfuse_projections


def merge_adapters(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (explicit; reversible with `unmerge_adapters`)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Return the plain model with the active adapters folded in and every LoRA wrapper removed.

    The result is an ordinary transformers model: `save_pretrained` writes a checkpoint that
    `from_pretrained` loads without lorakit. Saved modules (a trained head) keep the active copy.
    A quantised (QLoRA) base is dequantised to fp32 first, and the adapters merged in fp32.
    """
    unfuse_projections(model)  # packed sibling weights get their own storage: save_pretrained needs that
    if any(is_quantized(layer.base_layer) for _, layer in lora_layers(model)):
        dequantize_model(model)
    for name, layer in lora_layers(model):
        layer.merge()
        model.set_submodule(name, layer.base_layer)
    for name, wrapper in saved_modules(model):
        chosen = wrapper.copies[wrapper.active] if wrapper.active in wrapper.copies else wrapper.original_module
        model.set_submodule(name, chosen)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    model.requires_grad_(False)
    return model
