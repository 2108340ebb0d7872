"""A SwiGLU MLP with LoRA on its three projections as one autograd function.

    g = gate(x),  u = up(x),  h = silu(g) * u,  y = down(h)       each projection: W x + s B A drop(x)

Autograd through the plain module keeps g (for silu), silu(g) and u (for the product) and h (for
down's LoRA): four (tokens x intermediate) activations per layer, the largest thing a LoRA step
stores for Llama-family models. This function keeps only g and u and recomputes h in backward (a
few elementwise operations), halving the MLP's share of the activation memory; the LoRA parts use
the same math as the fused linear (lora/fused.py).

`fuse_swiglu_mlps(model)` switches it on for every Llama/Qwen/Mistral-style MLP whose three
projections are LoRA layers on the fused path; at each call the MLP checks that this still holds
(an adapter merged, disabled, several active...) and otherwise runs its own forward unchanged; once
its projections are plain layers again (`merge_and_unload`) it drops the fused path for good.
`unfuse_swiglu_mlps(model)` switches it off again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.fused import lora_backward, lora_forward
from lorakit.lora.layer import LoraLayer

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FusedSwiGLULora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, training: bool, *parts):
        """`parts`: (weight, bias, A, B, scaling, p) for gate, up and down, flattened."""
        gate, up, down = parts[0:6], parts[6:12], parts[12:18]
        g, ug, keep_g = lora_forward(x, *gate, training)
        u, uu, keep_u = lora_forward(x, *up, training)
        h = F.silu(g) * u  # (..., intermediate); not kept
        y, ud, keep_d = lora_forward(h, *down, training)
        ctx.save_for_backward(x, g, u, ug, uu, ud, keep_g, keep_u, keep_d, *_tensors(gate), *_tensors(up), *_tensors(down))
        ctx.scalings = (gate[4], up[4], down[4])
        ctx.ps = (gate[5], up[5], down[5])
        return y

    @staticmethod
    def backward(ctx, grad):
        x, g, u, ug, uu, ud, keep_g, keep_u, keep_d, *weights = ctx.saved_tensors
        (Wg, Ag, Bg), (Wu, Au, Bu), (Wd, Ad, Bd) = weights[0:3], weights[3:6], weights[6:9]
        (sg, su, sd), (pg, pu, pd) = ctx.scalings, ctx.ps
        silu = F.silu(g)
        h = silu * u  # recomputed instead of stored
        dh, dAd, dBd = lora_backward(grad, h, Wd, Ad, Bd, ud, keep_d, sd, pd)
        del h
        du = silu.mul_(dh)  # silu is ours: reuse its memory
        dg = torch.ops.aten.silu_backward(dh * u, g)  # dh u silu'(g), silu'(g) = sig (1 + g (1 - sig)), one pass
        del dh, silu
        dx_g, dAg, dBg = lora_backward(dg, x, Wg, Ag, Bg, ug, keep_g, sg, pg, ctx.needs_input_grad[0])
        dx_u, dAu, dBu = lora_backward(du, x, Wu, Au, Bu, uu, keep_u, su, pu, ctx.needs_input_grad[0])
        dx = dx_g + dx_u if ctx.needs_input_grad[0] else None
        # Gradients for (x, training, then weight, bias, A, B, scaling, p per projection).
        return (dx, None, None, None, dAg, dBg, None, None, None, None, dAu, dBu, None, None, None, None, dAd, dBd, None, None)


def _tensors(parts: tuple) -> tuple:
    weight, _bias, A, B, _scaling, _p = parts
    return weight, A, B


def _is_swiglu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(getattr(module, name, None), LoraLayer) for name in PROJECTIONS)


class _FusedForward:
    """Stands in for one MLP's `forward`: the fused function when it applies, else the module's own."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layers = [getattr(self.module, name) for name in PROJECTIONS]
        if not all(isinstance(layer, LoraLayer) for layer in layers):  # unloaded (merge_and_unload): for good
            del self.module.forward
            return type(self.module).forward(self.module, x)
        if not all(layer.can_fuse() and layer.base_layer.bias is None for layer in layers):
            return type(self.module).forward(self.module, x)
        parts = [part for layer in layers for part in layer.fused_parts()]
        return FusedSwiGLULora.apply(x.to(parts[2].dtype), self.module.training, *parts)


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Give every SwiGLU MLP whose projections are LoRA layers the fused path; returns how many."""
    count = 0
    for module in model.modules():
        if _is_swiglu(module) and not isinstance(module.__dict__.get("forward"), _FusedForward):
            module.forward = _FusedForward(module)
            count += 1
    return count


def unfuse_swiglu_mlps(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _FusedForward):
            del module.forward
