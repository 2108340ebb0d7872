"""Optimiser and learning-rate schedule for the trainable parameters."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from lorakit.config import ConfigError, TrainConfig
from lorakit.lora.adapters import lora_layers

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups: decay on matrices only; LoRA+ gives what each adapter names (B for plain LoRA) a
    `loraplus_lr_ratio` times larger rate."""
    fast = {id(p) for _, layer in lora_layers(model) for a in layer.adapters.values() for p in a.loraplus_params()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        decay = param.dim() >= 2
        is_b = id(param) in fast
        groups.setdefault((decay, is_b), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr": config.lr * (config.loraplus_lr_ratio if is_b else 1.0),
        }
        for (decay, is_b), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if not groups:
        raise ConfigError("nothing to train: the model has no parameter with requires_grad")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    return build_8bit_optimizer(groups, config)


def build_8bit_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with its two moments stored in 8 bits (blockwise), same betas and eps as `adamw`.

    Tensors under 4,096 elements keep 32-bit moments (bitsandbytes' `min_8bit_size`). Paging moves
    the moments to CPU memory under GPU memory pressure; on a CPU it is plain AdamW8bit.
    """
    from lorakit.quant.bnb import bnb

    try:
        lib = bnb()
    except ImportError:
        raise ConfigError(f"train.optimizer: {config.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    paged = config.optimizer == "paged_adamw_8bit"
    if paged and not any(p.is_cuda for g in groups for p in g["params"]):
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        log.info("paged_adamw_8bit pages only GPU memory; on CPU it runs as adamw_8bit")
    cls = lib.optim.PagedAdamW8bit if paged else lib.optim.AdamW8bit
    return cls(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak rate at `step` (0-based): a linear warm-up, then cosine, linear or constant, as
    transformers' schedules after the warm-up. The warm-up's steps run at 1/(w+1), ..., w/(w+1) of the peak, where
    transformers' run at 0, 1/w, ...: its first step, at rate 0, does nothing."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    # the ratio's share of the steps, rounded down (transformers rounds up), and at least one step when the ratio
    # asks for a warm-up (0.03 of 30 steps rounded down to none)
    warmup = max(1, int(config.warmup_ratio * total_steps)) if config.warmup_ratio > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.scheduler)
    )
