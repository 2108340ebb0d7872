"""Switches for the lean training path: fused LoRA kernels, grouped attention, an allocator that lets go.

Each piece is exact (same loss and gradients as the plain path, tested) and only changes what
is kept in memory and how many passes over it are made:
  - the fused base+LoRA linear (lora/fused.py) and SwiGLU MLP (lora/fused_mlp.py);
  - RMSNorm with a frozen weight, and the rotary embedding, as one function each (train/fused_norm.py,
    train/fused_rotary.py);
  - grouped-query attention without repeated key/value copies (train/attention.py);
  - (`train.fuse_projections`) q/k/v and gate/up as one GEMM each over their packed frozen weights,
    the siblings' LoRA A's concatenated (lora/fused_siblings.py);
  - (`train.half_base`) the frozen bases in fp16/bf16 where this CPU multiplies them faster, LoRA in
    fp32 (train/half_base.py; within 1% of fp32's loss curve, not exact);
  - (opt-in, `train.release_memory`) glibc's allocator told to map large blocks and unmap them
    when freed, instead of keeping them in its heap, so the resident set follows the live
    tensors; measured here: ~0.8x the peak memory at ~0.6x the speed (every step page-faults its
    activations anew), hence off by default.
"""

from __future__ import annotations

import logging

from torch import nn

from lorakit.lora.adapters import lora_layers
from lorakit.lora.fused_mlp import fuse_swiglu_mlps
from lorakit.lora.fused_siblings import fuse_projections
from lorakit.malloc import set_malloc_thresholds
from lorakit.train.attention import use_grouped_attention
from lorakit.train.fused_norm import fuse_rms_norms
from lorakit.train.fused_rotary import use_fused_rotary
from lorakit.train.half_base import use_half_base

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 256 * 1024  # activations are larger; small bookkeeping stays in the heap


def use_fused_paths(model: nn.Module, fused: bool = True, projections: bool = True, half_base: str = "off") -> dict:
    """Turn the fused LoRA paths and grouped attention on (or the fused paths off); returns what applies.

    `projections`: also pack sibling projections (q/k/v, gate/up) to run as one GEMM each.
    `half_base`: auto | off | fp16 | bf16, the frozen bases' type on a CPU (train/half_base.py).
    """
    for _, layer in lora_layers(model):
        layer.fused = fused
    if not fused:
        return {"fused_mlps": 0, "projection_groups": 0, "fused_norms": 0, "fused_rotary": False,
                "grouped_attention": False, "half_base": None}
    return {
        "half_base": use_half_base(model, half_base),  # before packing: the packed buffers take the bases' type
        "fused_mlps": fuse_swiglu_mlps(model),
        "projection_groups": fuse_projections(model) if projections else 0,
        "fused_norms": fuse_rms_norms(model),
        "fused_rotary": use_fused_rotary(model),
        "grouped_attention": use_grouped_attention(model),
    }


def release_freed_memory() -> bool:
    """Make glibc return large freed blocks to the OS at once (process-wide); False where not glibc."""
    return set_malloc_thresholds(MMAP_THRESHOLD_BYTES, 4 * MMAP_THRESHOLD_BYTES)
