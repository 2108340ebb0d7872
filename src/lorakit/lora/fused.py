"""The lean training path: base matmul and an adapter's term in one autograd function.

    y = x W^T + b + (the adapter's term)          W, b frozen

Plain autograd keeps every intermediate of the term (for LoRA with dropout, a dropped-out copy of
x per layer). Here the adapter computes forward and backward itself (`fused_forward`,
`fused_backward`, see lora/variants/lora.py), keeping only what its backward needs, and no
gradient is ever formed for W or b. The fused SwiGLU MLP (lora/fused_mlp.py) chains the same
halves through three projections.
"""

from __future__ import annotations

import torch

from lorakit.train.fused_norm import restored_input, saved_input


class FusedAdapterLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, adapter, training: bool, *params):
        y, saved = adapter.fused_forward(x, weight, bias, params, training)
        ctx.save_for_backward(*saved_input(x), weight, *params, *saved)
        ctx.adapter, ctx.counts, ctx.x_shape = adapter, (len(params), len(saved)), x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        *x_parts, weight = saved[:4]
        x, rest = restored_input(x_parts, ctx.x_shape), saved[4:]
        n_params = ctx.counts[0]
        params, saved = rest[:n_params], rest[n_params:]
        grad_x, grads = ctx.adapter.fused_backward(grad, x, weight, params, saved, ctx.needs_input_grad[0])
        return (grad_x, None, None, None, None, *grads)


def fused_adapter_linear(x, weight, bias, adapter, training: bool) -> torch.Tensor:
    """`weight` is (out, in) as nn.Linear stores it (pass Conv1D's weight transposed)."""
    return FusedAdapterLinear.apply(x, weight, bias, adapter, training, *adapter.fused_params())
