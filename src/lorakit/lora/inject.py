"""Put LoRA layers into a model by module name, freeze the rest, and report what trains."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import replace

from torch import nn

from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.adapters import set_adapter
from lorakit.lora.base import layer_kind
from lorakit.lora.inits import MOVES_BASE
from lorakit.lora.merge import untie_weights
from lorakit.lora.layer import LoraLayer, SavedModule
from lorakit.lora.variants import variant_for

log = logging.getLogger(__name__)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "smollm3"], LLAMA_TARGETS),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], BERT_TARGETS),
    "gpt2": ["c_attn", "c_proj"],
}
# Heads that SEQ_CLS models train in full, as PEFT does for task_type="SEQ_CLS".
CLASSIFIER_HEADS = ["classifier", "score"]
ALL_LINEAR = "all-linear"


def default_targets(model: nn.Module) -> list[str]:
    """The target module names for the model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"lora.target_modules: no default for model type {model_type!r}; name the modules "
            f"(known defaults: {', '.join(sorted(DEFAULT_TARGETS))}) or use '{ALL_LINEAR}'"
        )
    return list(DEFAULT_TARGETS[model_type])


def _is_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's matching: a string is a regex on the full name; a list matches dotted-name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(p)}($|\..*)", name) for p in prefixes)


def _all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every Linear/Conv1D but the output head, as PEFT's 'all-linear' does."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if layer_kind(module) in ("linear", "conv1d") and module is not output
        }
    )


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules `config` targets; an error naming close matches if there are none."""
    targets = config.target_modules
    if targets is None:
        targets = default_targets(model)
    if targets == ALL_LINEAR:
        targets = _all_linear_names(model)
    skip = config.modules_to_save or []
    names = [
        name
        for name, module in model.named_modules()
        if name and _is_target(name, targets) and not _inside(name, skip)
    ]
    names = [n for n in names if not n.endswith(".base_layer")]
    if not names:
        have = sorted({n.split(".")[-1] for n, m in model.named_modules() if layer_kind(m) is not None})
        wanted = [targets] if isinstance(targets, str) else targets
        close = list(dict.fromkeys(c for t in wanted for c in difflib.get_close_matches(t, have, n=3, cutoff=0.4)))
        raise ConfigError(
            f"lora.target_modules: {targets!r} matched no module of {type(model).__name__}; "
            f"closest names it has: {', '.join(close or have[:8])}"
        )
    for name in names:
        module = model.get_submodule(name)
        if layer_kind(module) is None and not isinstance(module, LoraLayer):
            raise ConfigError(
                f"lora.target_modules: '{name}' is a {type(module).__name__}; LoRA wraps nn.Linear, "
                "GPT-2 Conv1D and nn.Embedding"
            )
    return names


def inject(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to every module `config` targets, freeze the rest, return the model.

    The model keeps its own class and API (generate, save_pretrained, ...). Calling `inject` again
    with another name adds a second adapter beside the first; `set_adapter` picks which is active.

    Raises:
        ConfigError: the targets match nothing, or match a module LoRA cannot wrap.
    """
    config = config or LoraConfig()
    configs = getattr(model, "lora_configs", {})
    if adapter_name in configs:
        raise ConfigError(f"adapter '{adapter_name}' already exists on this model; pick another name")
    # Resolve what the config leaves open, on a copy, so the saved adapter_config.json is explicit.
    config = replace(config, target_modules=config.target_modules or default_targets(model))
    if config.task_type == "SEQ_CLS" and config.modules_to_save is None:
        heads = [h for h in CLASSIFIER_HEADS if any(n.split(".")[-1] == h for n, _ in model.named_modules())]
        config.modules_to_save = heads or None
    if config.base_model_name_or_path is None:
        from lorakit.models import portable_name

        config.base_model_name_or_path = portable_name(getattr(getattr(model, "config", None), "name_or_path", None)
                                                       or None)
    if not configs:  # the first adapter freezes the base; later ones find it frozen already
        model.requires_grad_(False)

    variant = variant_for(config)
    names = find_targets(model, config)
    for name in names:
        kind = layer_kind(model.get_submodule(name)) or model.get_submodule(name).kind
        if kind not in variant.KINDS:
            raise ConfigError(
                f"lora.target_modules: '{name}' is a {kind} layer; {variant.__name__} sits on "
                f"{', '.join(variant.KINDS)} layers only; leave it out of target_modules"
            )
    _untie_moved_weights(model, names, config)
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        r, alpha = config.rank_and_alpha(name)
        layer.add_adapter(
            adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights, variant,
            **variant.options(config),
        )
        if layer is not module:
            model.set_submodule(name, layer)
    _wrap_saved_modules(model, config, adapter_name)
    model.lora_configs = {**configs, adapter_name: config}
    set_adapter(model, adapter_name)
    return model


def _untie_moved_weights(model: nn.Module, names: list[str], config: LoraConfig) -> list[str]:
    """PiSSA and OLoRA take part of a target's weight into the adapter: a target that shares its weight with another
    module (a head tied to the embeddings) is untied from it first, so the other module is left as it was and the
    model's output is unchanged at start (PEFT changes the embeddings there). Returns the modules untied."""
    if config.init_lora_weights not in MOVES_BASE:
        return []
    bases = [m.base_layer if isinstance(m, LoraLayer) else m for m in map(model.get_submodule, names)]
    moved = {id(b.weight) for b in bases if layer_kind(b) != "embedding" and getattr(b, "weight", None) is not None}
    untied = untie_weights(model, moved)
    if untied:
        log.info("lora.init_lora_weights %s changes a tied weight: %s now holds a copy of its own",
                 config.init_lora_weights, ", ".join(untied))
    return untied


def _wrap_saved_modules(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    for target in config.modules_to_save or []:
        names = [
            n
            for n, _ in model.named_modules()
            if (n == target or n.endswith(f".{target}")) and ".copies." not in n
        ]
        if not names:
            raise ConfigError(f"lora.modules_to_save: {target!r} matched no module of {type(model).__name__}")
        for name in names:
            module = model.get_submodule(name)
            wrapper = module if isinstance(module, SavedModule) else SavedModule(module)
            wrapper.add_copy(adapter_name)
            if wrapper is not module:
                model.set_submodule(name, wrapper)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counted once each even when tied."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(_weights_in(p) for p in params)


def _weights_in(param) -> int:
    """bitsandbytes packs two 4-bit weights per byte: count weights, not bytes."""
    return param.numel() * 2 if type(param).__name__ == "Params4bit" else param.numel()


def trainable_report(model: nn.Module) -> str:
    """PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
    trainable, total = trainable_counts(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
