"""Several named adapters on one base: list, switch, disable and delete them."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.lora.int8_factors import round_rows
from lorakit.lora.layer import LoraLayer, SavedModule


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every LoraLayer in the model, in `named_modules` order."""
    return _modules_of(model, LoraLayer)


def saved_modules(model: nn.Module) -> list[tuple[str, SavedModule]]:
    """(name, wrapper) for every module trained in full per adapter, in `named_modules` order."""
    return _modules_of(model, SavedModule)


def _modules_of(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """What `named_modules` yields of `kind`, without walking into LoRA layers: their children are a base layer
    and the adapters, never either kind, and with many adapters loaded they are most of a model's modules
    (16 adapters on SmolLM2-135M: 15,000 of them; every mixed batch walks the model)."""
    found, seen, stack = [], set(), [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, kind):
            found.append((name, module))
        if isinstance(module, LoraLayer):
            continue
        children = [(f"{name}.{key}" if name else key, child) for key, child in module._modules.items()]
        stack.extend(reversed([item for item in children if item[1] is not None]))  # popped in order
    return found


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    configs = getattr(model, "lora_configs", {})
    if name not in configs:
        raise KeyError(f"no adapter '{name}' on this model; it has: {', '.join(configs) or 'none'}")
    return configs[name]


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make `name` (or several names, applied together) the active adapter(s); only they train."""
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        adapter_config(model, n)
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name in names)
    for _, wrapper in saved_modules(model):
        wrapper.active = next((n for n in names if n in wrapper.copies), None)
        for copy_name, copy in wrapper.copies.items():
            copy.requires_grad_(copy_name == wrapper.active)
    _set_bias_trainable(model, {adapter_config(model, n).bias for n in names})


def _set_bias_trainable(model: nn.Module, modes: set[str]) -> None:
    if "all" in modes:
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") and not in_saved_module(param_name):
                param.requires_grad_(True)
    elif "lora_only" in modes:
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the bare base inside the block: merged adapters are unmerged on entry and merged back on exit."""
    layers = [m for _, m in lora_layers(model)]
    merged = [(layer, list(layer.merged)) for layer in layers if layer.merged]
    for layer, _ in merged:
        layer.unmerge()
    modules = layers + [m for _, m in saved_modules(model)]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False
        for layer, names in merged:
            layer.merge(names)


@contextmanager
def use_adapter(model: nn.Module, name: str):
    """Run with adapter `name` alone active inside the block (trainable flags untouched), then switch back.

    A frozen copy of an adapter can so serve as a reference model beside the adapter being trained.
    """
    adapter_config(model, name)
    layers = [m for _, m in lora_layers(model)]
    wrappers = [m for _, m in saved_modules(model)]
    before = [list(layer.active) for layer in layers], [w.active for w in wrappers]
    if any(layer.merged for layer in layers):
        raise RuntimeError("use_adapter needs unmerged adapters; call unmerge_adapters(model) first")
    for layer in layers:
        layer.active = [name] if name in layer.adapters else []
    for wrapper in wrappers:
        wrapper.active = name if name in wrapper.copies else None
    try:
        yield model
    finally:
        for layer, active in zip(layers, before[0]):
            layer.active = active
        for wrapper, active in zip(wrappers, before[1]):
            wrapper.active = active


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; layers left with no adapter stay wrapped and act as the base."""
    adapter_config(model, name)
    remove_adapter_parts(model, name)


def remove_adapter_parts(model: nn.Module, name: str) -> None:
    """Remove whatever of adapter `name` the model holds, a load that failed half-way included (no config needed)."""
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
    for _, wrapper in saved_modules(model):
        if name in wrapper.copies:
            del wrapper.copies[name]
            wrapper.active = None if wrapper.active == name else wrapper.active
    model.lora_configs = {k: v for k, v in getattr(model, "lora_configs", {}).items() if k != name}


# serve/generate --lora-dtype: the type adapters round to
LORA_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}


@torch.no_grad()
def round_adapter(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Round adapter `name` to `dtype`'s values, kept in its own type, as an adapter trained or saved in `dtype`
    holds them: in bf16 every parameter (its factors; a DoRA magnitude too); in int8 each rank of its factors, a row
    of A and a column of B, to int8 values times a power of two (lora/int8_factors.py), other parameters as they
    are. A mixed batch's kernels then read the factors at half (bf16) or a quarter (int8) of the bytes
    (lora/column_kernel.py's lane layouts); the arithmetic is unchanged."""
    adapter_config(model, name)
    for _, layer in lora_layers(model):
        adapter = layer.adapters._modules.get(name)
        if adapter is not None and dtype == torch.int8:
            adapter.A.copy_(round_rows(adapter.A))
            adapter.B.copy_(round_rows(adapter.B.t()).t())
            continue
        for param in [] if adapter is None else adapter.parameters():
            if param.is_floating_point():
                param.copy_(param.to(dtype))


def in_saved_module(param_name: str) -> bool:
    """Saved modules train through their per-adapter copy, never through the original."""
    return ".copies." in param_name or ".original_module." in param_name
