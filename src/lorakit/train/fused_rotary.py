"""Rotary position embedding as one autograd function that keeps only cos and sin.

    q' = q cos + rot(q) sin,   rot(x) = (-x2, x1)      (the same for k)
    dq = g cos - rot(g sin)                            (rot's transpose is -rot)

transformers' `apply_rotary_pos_emb` runs through plain autograd, which keeps q, rot(q), k and rot(k)
for the products' backward: four (tokens x heads x head_dim) tensors per layer, ~6 KB a token a
layer for SmolLM2. The products are computed exactly as transformers does, so outputs are equal
bit for bit; only the backward is ours.

`use_fused_rotary(model)` swaps the function in the model's modeling module (process-wide, for
that architecture) after checking on random tensors that the module's own function computes
exactly this; architectures that rotate differently (partial rotary, interleaved) are left alone.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return dq * cos - _rotate_half(dq * sin), dk * cos - _rotate_half(dk * sin), None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for transformers' function of the same name (Llama, Qwen2, Mistral...)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if torch.is_grad_enabled() and not (cos.requires_grad or sin.requires_grad):
        return FusedRotary.apply(q, k, cos, sin)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


_ORIGINALS: dict[str, object] = {}  # modeling module name -> the function swapped out


def use_fused_rotary(model: nn.Module) -> bool:
    """Swap in the fused rotary for the model's architecture if its own function is the standard one."""
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or original is apply_rotary_pos_emb:
        return original is apply_rotary_pos_emb
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=generator), torch.randn(2, 1, 5, 8, generator=generator)
    cos, sin = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    try:
        theirs = original(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the function this replaces
        return False
    ours = apply_rotary_pos_emb(q, k, cos, sin)
    if not all(torch.equal(a, b) for a, b in zip(theirs, ours)):
        return False
    _ORIGINALS[module.__name__] = original
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def restore_rotary(model: nn.Module) -> None:
    """Put transformers' own function back for the model's architecture."""
    module = sys.modules.get(type(model).__module__)
    if module is not None and module.__name__ in _ORIGINALS:
        module.apply_rotary_pos_emb = _ORIGINALS.pop(module.__name__)
