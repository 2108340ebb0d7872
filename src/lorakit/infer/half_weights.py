"""Frozen linear weights in a half type for generation and serving, where this CPU multiplies halves faster.

Decoding a batch multiplies a few rows by every weight matrix at each step, so a step's time is
mostly reading the weights; on a CPU with fast half GEMMs (AMX's bf16) keeping them in a half type
halves that read and runs the products several times faster. `use_half_weights` turns every
plain `nn.Linear` of the model except the output head into a `HalfWeightLinear`: its weight (and
bias) stored in the half type, its input and output still in fp32, the GEMM accumulating in fp32
inside. LoRA layers wrap these bases as they wrap any Linear, and their adapters' terms, the
embeddings, the norms, attention, the head and the KV cache stay fp32. Outputs are close to the fp32
model's, not equal: the weights are rounded to the half type.

`auto` times fp32, fp16 and bf16 at a decode batch's shape (train/half_base.py's probe, skipped for
models too small for it to pay) and casts only where a half type takes at most HALF_MARGIN of
fp32's time; `off` never casts.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.lora.base import HalfWeightLinear
from lorakit.onednn_caches import widen_onednn_caches
from lorakit.train.half_base import HALF_TYPES, auto_half_type, leave_the_weights_file

HALF_WEIGHT_SETTINGS = ("off", "auto", "fp16", "bf16")
DECODE_ROWS = 16  # the probe's row count: a decode step of a full batch


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """Every plain fp32 nn.Linear of the model but the output head (tied to the embeddings in many models)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules()
            if type(m) is nn.Linear and m is not head and m.weight.dtype == torch.float32]


@torch.no_grad()
def use_half_weights(model: nn.Module, setting: str = "auto", rows: int = DECODE_ROWS) -> str | None:
    """Cast the model's linear weights as `setting` (off | auto | fp16 | bf16) says; returns the type used."""
    if setting not in HALF_WEIGHT_SETTINGS:
        raise ValueError(f"half weights: expected one of {', '.join(HALF_WEIGHT_SETTINGS)}, got {setting!r}")
    linears = plain_linears(model)
    if setting == "off" or not linears or linears[0].weight.device.type != "cpu":
        return None
    # oneDNN keeps one primitive (with its reordered weights) per GEMM shape: room for every decode batch
    # size of every weight, so that decoding does not rebuild them step after step (onednn_caches.py).
    widen_onednn_caches(8 * rows + 64)
    name = setting
    if setting == "auto":
        widest = max(linears, key=lambda m: m.weight.numel()).weight
        name = auto_half_type(widest.shape[1], widest.shape[0], rows)
        if name is None:
            return None
    for linear in linears:
        linear.weight.data = linear.weight.data.to(HALF_TYPES[name])
        if linear.bias is not None:
            linear.bias.data = linear.bias.data.to(HALF_TYPES[name])
        linear.__class__ = HalfWeightLinear
    leave_the_weights_file(model)  # the fp32 pages the cast read would otherwise stay resident
    return name
