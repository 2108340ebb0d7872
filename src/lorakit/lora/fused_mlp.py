"""A SwiGLU MLP with LoRA on its three projections as one autograd function.

    g = gate(x),  u = up(x),  h = silu(g) * u,  y = down(h)       each projection: W x + s B A drop(x)

Autograd through the plain module keeps g (for silu), silu(g) and u (for the product) and h (for
down's LoRA): four (tokens x intermediate) activations per layer, the largest thing a LoRA step
stores for Llama-family models. This function keeps only g and u and recomputes h in backward (a
few elementwise operations), halving the MLP's share of the activation memory; each projection's
term is its adapter's own fused forward and backward halves, as in the fused linear (lora/fused.py).

`fuse_swiglu_mlps(model)` switches it on for every Llama/Qwen/Mistral-style MLP whose three
projections are LoRA layers on the fused path; at each call the MLP checks that this still holds
(an adapter merged, disabled, several active...) and otherwise runs its own forward unchanged; once
its projections are plain layers again (`merge_and_unload`) it drops the fused path for good.
`unfuse_swiglu_mlps(model)` switches it off again. Where gate and up are a packed sibling group
(lora/fused_siblings.py), `FusedSwiGLUPacked` runs them as one GEMM forward and one for dL/dx.

Where the frozen weights are kept in a half type (train.half_base, whose GEMMs already round their
products to it), g and u are kept in that type too (`kept_activation`): half their memory, within
the half base's 1% loss-curve bound rather than exact. The MLP's input x, a fused norm's output, is
kept as that norm's recipe (train/fused_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.fused_siblings import siblings_backward, siblings_forward
from lorakit.lora.layer import LoraLayer
from lorakit.train.fused_norm import restored_input, saved_input

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FusedSwiGLULora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, training: bool, adapters: tuple, *parts):
        """`adapters`: the gate, up and down adapters; `parts`: per projection its (out, in) weight and
        then its adapter's `fused_params()`, flattened."""
        (gate, up, down), (wg, pg), (wu, pu), (wd, pd) = adapters, *_split(adapters, parts)
        g, saved_g = gate.fused_forward(x, wg, None, pg, training)
        u, saved_u = up.fused_forward(x, wu, None, pu, training)
        h = F.silu(g) * u  # (..., intermediate); not kept
        y, saved_d = down.fused_forward(h, wd, None, pd, training)
        g, u = kept_activation(g, wg), kept_activation(u, wu)
        ctx.save_for_backward(*saved_input(x), g, u, *parts, *saved_g, *saved_u, *saved_d)
        ctx.adapters, ctx.counts, ctx.x_shape = adapters, (len(parts), len(saved_g), len(saved_u)), x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        *x_parts, g, u = saved[:5]
        x, rest = restored_input(x_parts, ctx.x_shape), saved[5:]
        g, u = g.to(x.dtype), u.to(x.dtype)
        n_parts, n_g, n_u = ctx.counts
        parts, rest = rest[:n_parts], rest[n_parts:]
        saved_g, saved_u, saved_d = rest[:n_g], rest[n_g : n_g + n_u], rest[n_g + n_u :]
        (gate, up, down), (wg, pg), (wu, pu), (wd, pd) = ctx.adapters, *_split(ctx.adapters, parts)
        silu = F.silu(g)
        h = silu * u  # recomputed instead of stored
        dh, grads_d = down.fused_backward(grad, h, wd, pd, saved_d, True)
        del h
        du = silu.mul_(dh)  # silu is ours: reuse its memory
        dg = torch.ops.aten.silu_backward(dh * u, g)  # dh u silu'(g), silu'(g) = sig (1 + g (1 - sig)), one pass
        del dh, silu
        dx_g, grads_g = gate.fused_backward(dg, x, wg, pg, saved_g, ctx.needs_input_grad[0])
        dx_u, grads_u = up.fused_backward(du, x, wu, pu, saved_u, ctx.needs_input_grad[0])
        dx = dx_g + dx_u if ctx.needs_input_grad[0] else None
        # Gradients for (x, training, adapters, then per projection its weight and its adapter's params).
        return (dx, None, None, None, *grads_g, None, *grads_u, None, *grads_d)


class FusedSwiGLUPacked(torch.autograd.Function):
    """As FusedSwiGLULora, with gate and up as one GEMM over their packed weights (lora/fused_siblings.py)."""

    @staticmethod
    def forward(ctx, x, training: bool, adapters: tuple, w_gate_up, w_down, *params):
        """`adapters`: gate, up, down; `params`: gate's then up's then down's `fused_params()`."""
        (gate, up, down) = adapters
        n = len(gate.fused_params()) + len(up.fused_params())
        gu, saved_gu = siblings_forward(x, w_gate_up, None, (gate, up), params[:n], training)  # (..., 2 inter)
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g) * u  # not kept
        y, saved_d = down.fused_forward(h, w_down, None, params[n:], training)
        gu_kept = kept_activation(gu, w_gate_up)
        ctx.save_for_backward(*saved_input(x), gu_kept, w_gate_up, w_down, *params, *saved_gu, *saved_d)
        ctx.adapters, ctx.counts, ctx.x_shape = adapters, (n, len(params), len(saved_gu)), x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        *x_parts, gu, w_gate_up, w_down = saved[:6]
        x, rest = restored_input(x_parts, ctx.x_shape), saved[6:]
        gu = gu.to(x.dtype)
        n, n_params, n_saved = ctx.counts
        params, saved_gu, saved_d = rest[:n_params], rest[n_params : n_params + n_saved], rest[n_params + n_saved :]
        gate, up, down = ctx.adapters
        g, u = gu.chunk(2, dim=-1)
        silu = F.silu(g)
        h = silu * u  # recomputed instead of stored
        dh, grads_d = down.fused_backward(grad, h, w_down, params[n:], saved_d, True)
        del h
        dgu = torch.empty_like(gu)  # (..., 2 inter): [dg, du], one GEMM for dx
        dg, du = dgu.chunk(2, dim=-1)
        torch.mul(dh, u, out=du)  # dh u, parked in du's place
        torch.ops.aten.silu_backward.grad_input(du, g, grad_input=dg)  # dg = dh u silu'(g)
        torch.mul(silu, dh, out=du)
        del dh, silu
        dx, grads_gu = siblings_backward(dgu, x, w_gate_up, (gate, up), params[:n], saved_gu, ctx.needs_input_grad[0])
        return (dx, None, None, None, None, *grads_gu, *grads_d)


def kept_activation(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What backward keeps of a projection's output t: t in the weight's type where that is a half type
    below t's (a half base), else t itself."""
    half = weight.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
    return t.to(weight.dtype) if half else t


def _split(adapters: tuple, parts: tuple) -> list[tuple]:
    """[(weight, params)] per projection from the flattened parts."""
    out, at = [], 0
    for adapter in adapters:
        n = len(adapter.fused_params())
        out.append((parts[at], tuple(parts[at + 1 : at + 1 + n])))
        at += 1 + n
    return out


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
        group = layers[0].sibling_group
        if group is not None and group.layers == layers[:2] and group.applies():  # gate/up packed: one GEMM
            adapters, params = group.adapters_and_params()
            down, w_down, _bias = layers[2].fused_parts()
            params += list(down.fused_params())
            return FusedSwiGLUPacked.apply(
                x.to(params[0].dtype), self.module.training, (*adapters, down), group.weight, w_down, *params
            )
        adapters, parts = [], []
        for layer in layers:
            adapter, weight, _bias = layer.fused_parts()
            adapters.append(adapter)
            parts += [weight, *adapter.fused_params()]
        return FusedSwiGLULora.apply(x.to(parts[1].dtype), self.module.training, tuple(adapters), *parts)


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
