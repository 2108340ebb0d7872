"""Plain linear layers of a serving model computed as `lora.base.base_linear` does.

A decode step multiplies a few rows by every weight matrix; `base_linear` runs those as W x^T,
which on the CPU reads each weight once instead of repacking it first (lora/base.py). LoRA layers
and half-weight layers already compute their base that way; `use_decode_linears` turns the
remaining plain `nn.Linear`s (the output head, and every projection of a model with its adapter
merged) into `FrozenLinear`s, so a merged model decodes through the same kernels as a base serving
many adapters. Outputs equal the nn.Linear's up to float rounding. It also moves the model's frozen weights
onto transparent huge pages where the kernel offers them (infer/huge_pages.py): decode steps stream them faster.
"""

from __future__ import annotations

from torch import nn

from lorakit.infer.huge_pages import move_to_huge_pages
from lorakit.lora.base import FrozenLinear


def use_decode_linears(model: nn.Module) -> nn.Module:
    """Make every plain `nn.Linear` of `model` a `FrozenLinear` (same weights) and move its frozen weights onto
    huge pages where offered (the same values, another place); returns the model."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FrozenLinear
    move_to_huge_pages(model)
    return model
