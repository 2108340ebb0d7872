"""The lean training path: base matmul and LoRA update in one autograd function.

    y = x W^T + b + s * (drop(x) A^T) B^T          W, b frozen; A: (r, in), B: (out, r)

Plain autograd keeps the dropped-out copy of x (a full activation per LoRA layer when dropout
is on). This function keeps x, the r-wide product u = drop(x) A^T and, when dropout is on, a
one-byte keep-mask, and recomputes drop(x) in backward. It never forms gradients for W or b.

Backward, with g = dL/dy:
    dL/dB = s g^T u                    (out, r)
    du    = s g B                      (..., r)
    dL/dA = du^T drop(x)               (r, in)
    dL/dx = g W + (du A) * mask / (1 - p)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, training: bool):
        keep = None
        dropped = x
        if p > 0 and training:
            keep = torch.rand_like(x) >= p  # bool: a quarter of the memory of the dropped copy
            dropped = x * keep / (1 - p)
        u = dropped @ A.T  # (..., r)
        y = F.linear(x, weight, bias) + (u @ B.T) * scaling
        ctx.save_for_backward(x, weight, A, B, u, keep)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, A, B, u, keep = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_B = s * g2.T @ u.reshape(-1, u.shape[-1])  # (out, r)
        du = s * grad @ B  # (..., r)
        dropped = x if keep is None else x * keep / (1 - ctx.p)
        grad_A = du.reshape(-1, du.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_lora = du @ A
            if keep is not None:
                through_lora = through_lora * keep / (1 - ctx.p)
            grad_x = grad @ weight + through_lora
        return grad_x, None, None, grad_A, grad_B, None, None, None


def fused_lora_linear(x, weight, bias, A, B, scaling: float, p: float, training: bool) -> torch.Tensor:
    """`weight` is (out, in) as nn.Linear stores it (pass Conv1D's weight transposed)."""
    return FusedLoraLinear.apply(x, weight, bias, A, B, scaling, p, training)
