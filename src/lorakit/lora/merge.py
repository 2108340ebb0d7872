"""Fold adapters into the base weights, unload them, and combine several adapters into one."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.adapters import adapter_config, lora_layers, saved_modules, set_adapter
from lorakit.lora.base import dequantize_model, is_quantized


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


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, names: list[str], weights: list[float], new_name: str) -> LoraConfig:
    """Add adapter `new_name` whose update is exactly sum_i weights[i] * delta_i.

    Stacking A_i as rows and w_i * s_i * B_i as columns gives B' A' = sum_i w_i s_i B_i A_i, so the
    new adapter has rank sum(r_i) and scale 1 (alpha = r); no SVD, no approximation.

    Returns:
        The new adapter's config (it is also registered on the model, and made active).
    """
    if len(names) != len(weights) or not names:
        raise ValueError(f"add_weighted_adapter: {len(names)} names but {len(weights)} weights")
    configs = [adapter_config(model, n) for n in names]
    if new_name in model.lora_configs:
        raise ConfigError(f"adapter '{new_name}' already exists on this model; pick another name")
    if any(c.modules_to_save for c in configs[1:]):
        raise ConfigError("add_weighted_adapter: only the first adapter may carry modules_to_save")

    total_rank = sum(c.r for c in configs)
    rank_pattern: dict[str, int] = {}
    for module_name, layer in lora_layers(model):
        parts = [(_factors(layer, n, module_name), w) for n, w in zip(names, weights) if n in layer.adapters]
        if not parts:
            continue
        A = torch.cat([A for (A, _, _), _ in parts], dim=0)  # (sum r, in)
        B = torch.cat([B * (w * s) for (_, B, s), w in parts], dim=1)  # (out, sum r)
        rank = A.shape[0]
        if rank != total_rank:
            rank_pattern[module_name] = rank
        new = layer.add_adapter(new_name, rank, float(rank), 0.0, False, True)
        new.A.copy_(A)
        new.B.copy_(B)
    # alpha = r everywhere keeps the scale at 1, whatever rank each module ended up with.
    config = replace(
        configs[0],
        r=total_rank,
        lora_alpha=float(total_rank),
        lora_dropout=0.0,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in rank_pattern.items()},
        target_modules=sorted({n.split(".")[-1] for n, layer in lora_layers(model) if new_name in layer.adapters}),
    )
    for _, wrapper in saved_modules(model):
        if names[0] in wrapper.copies:
            wrapper.copies[new_name] = copy.deepcopy(wrapper.copies[names[0]])
    model.lora_configs = {**model.lora_configs, new_name: config}
    set_adapter(model, new_name)
    return config


def _factors(layer, name: str, module_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    factors = layer.adapters[name].low_rank_factors()
    if factors is None:
        raise ConfigError(
            f"add_weighted_adapter: adapter '{name}' on {module_name} is a {type(layer.adapters[name]).__name__}, "
            "whose update is more than s B A; weighted merges combine plain LoRA adapters"
        )
    return factors

