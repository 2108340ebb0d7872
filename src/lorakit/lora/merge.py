"""Fold adapters into the base weights and unload them (several adapters combine in lora/weighted.py)."""

from __future__ import annotations

from torch import nn

from lorakit.lora.adapters import lora_layers, saved_modules
from lorakit.lora.base import dequantize_model, is_quantized
from lorakit.lora.fused_siblings import unfuse_projections


def merge_adapters(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (explicit; reversible with `unmerge_adapters`).

    A weight the base ties to another module (the embeddings and the head) is untied first, see `untie_merged`.
    """
    untie_merged(model)
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
    A quantised (QLoRA) base is dequantised to fp32 first, and the adapters merged in fp32. A weight
    the base ties to another module is untied first (`untie_merged`), so the result equals the adapted model.
    """
    unfuse_projections(model)  # packed sibling weights get their own storage: save_pretrained needs that
    if any(is_quantized(layer.base_layer) for _, layer in lora_layers(model)):
        dequantize_model(model)
    untie_merged(model)
    for name, layer in lora_layers(model):
        layer.merge()
        model.set_submodule(name, layer.base_layer)
    for name, wrapper in saved_modules(model):
        chosen = wrapper.copies[wrapper.active] if wrapper.active in wrapper.copies else wrapper.original_module
        model.set_submodule(name, chosen)
    if _ties_embeddings(model) and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        _untie_config(model)  # a trained copy of the head or of the embeddings (modules_to_save) now stands apart
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    model.requires_grad_(False)
    return model


def untie_merged(model: nn.Module) -> list[str]:
    """Give each module that shares a LoRA-wrapped layer's weight its own copy; return their names.

    With tied embeddings, an adapter on `embed_tokens` changes the lookup only and one on `lm_head`
    the head only; folding either into the shared tensor would change both. The copies keep the
    adapted model's outputs, and the config no longer says the weights are tied, so a saved model
    loads the two apart.
    """
    return untie_weights(model, {id(layer.base_layer.weight) for _, layer in lora_layers(model)})


def untie_weights(model: nn.Module, weights: set[int]) -> list[str]:
    """Give each module but the first that holds one of `weights` (parameter ids) its own copy; return their
    names. The config then no longer says the weights are tied."""
    sharers: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False):
            if id(param) in weights:
                sharers.setdefault(id(param), []).append((name, module, key))
    untied = []
    for owners in sharers.values():
        for name, module, key in owners[1:]:  # the first keeps the original tensor
            param = getattr(module, key)
            setattr(module, key, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            untied.append(name)
    if untied:
        _untie_config(model)
    return untied


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.get_text_config().tie_word_embeddings
                and model.get_output_embeddings() is not None)


def _untie_config(model: nn.Module) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
