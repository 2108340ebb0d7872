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

`lora_forward` / `lora_backward` are the two halves, shared with the fused SwiGLU MLP
(lora/fused_mlp.py), so the LoRA math exists once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_forward(x, weight, bias, A, B, scaling: float, p: float, training: bool):
    """y = x W^T + b + s (drop(x) A^T) B^T; returns (y, u, keep) where u = drop(x) A^T, keep the bool mask."""
    keep = None
    if p > 0 and training:
        keep = torch.rand_like(x) >= p  # bool: a quarter of the memory of the dropped copy
        u = ((x * keep) @ A.T).div_(1 - p)  # (..., r); the inverted-dropout scale on the r-wide product
    else:
        u = x @ A.T  # (..., r)
    y = F.linear(x, weight, bias)
    # The LoRA term rides on the up-projection's GEMM (addmm_ with alpha = s): no (tokens x out)
    # temporaries for s * (u B^T) and the sum, each a full pass over the output.
    y.view(-1, y.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), B.T, alpha=scaling)
    return y, u, keep


def lora_backward(grad, x, weight, A, B, u, keep, scaling: float, p: float, need_grad_x: bool = True):
    """(dL/dx or None, dL/dA, dL/dB) for `lora_forward`, given g = dL/dy."""
    # The scale goes on the r-wide products, never on a (tokens x features) tensor.
    g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
    grad_B = (g2.T @ u.reshape(-1, u.shape[-1])).mul_(scaling)  # (out, r)
    du = (grad @ B).mul_(scaling)  # (..., r)
    du2 = du.reshape(-1, du.shape[-1])
    if keep is None:
        grad_A = du2.T @ x.reshape(-1, x.shape[-1])  # (r, in)
    else:  # drop(x) recomputed from the mask; 1 / (1 - p) applied to the (r, in) product
        grad_A = (du2.T @ (x * keep).reshape(-1, x.shape[-1])).div_(1 - p)
    grad_x = None
    if need_grad_x:
        grad_x = grad @ weight  # (..., in), contiguous
        if keep is None:  # du A added by the GEMM itself
            grad_x.view(-1, grad_x.shape[-1]).addmm_(du2, A)
        else:
            grad_x.add_((du @ A).mul_(keep), alpha=1 / (1 - p))
    return grad_x, grad_A, grad_B


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, training: bool):
        y, u, keep = lora_forward(x, weight, bias, A, B, scaling, p, training)
        ctx.save_for_backward(x, weight, A, B, u, keep)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, A, B, u, keep = ctx.saved_tensors
        grad_x, grad_A, grad_B = lora_backward(
            grad, x, weight, A, B, u, keep, ctx.scaling, ctx.p, need_grad_x=ctx.needs_input_grad[0]
        )
        return grad_x, None, None, grad_A, grad_B, None, None, None


def fused_lora_linear(x, weight, bias, A, B, scaling: float, p: float, training: bool) -> torch.Tensor:
    """`weight` is (out, in) as nn.Linear stores it (pass Conv1D's weight transposed)."""
    return FusedLoraLinear.apply(x, weight, bias, A, B, scaling, p, training)
