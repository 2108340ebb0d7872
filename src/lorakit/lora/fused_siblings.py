"""Sibling projections (q/k/v, gate/up) as one GEMM over their packed frozen weights.

Sibling LoRA layers read the same input x. Their frozen weights are packed once into one
(sum out, in) buffer, and each layer's weight becomes a view of its rows (no extra memory; merges
and loads write through the views). A training step then runs, for n siblings,

    y = x [W_1; ...; W_n]^T + [b_1; ...; b_n]           one GEMM instead of n
    u = x [A_1; ...; A_n]^T                             the LoRA A's concatenated (sum r wide): one GEMM
    y_i += s_i u_i B_i^T                                each sibling's B on its slice of y
    dL/dx = [g_1 ... g_n] [W_1; ...; W_n] + du [A_1; ...; A_n]     one GEMM, no sum of n products

With dropout each sibling draws its own mask (in the siblings' order, as the separate layers do),
so the A's cannot share x and run one by one; W is still one GEMM. The A matrices stay separate
parameters: a saved adapter is unchanged. Only plain LoRA (and rsLoRA) adapters group; any other
case (a variant, a merged or disabled adapter, a quantised base, a weight no longer a view of the
buffer) runs each layer's own path.

transformers calls q_proj, k_proj and v_proj (gate_proj and up_proj) one after another on the same
tensor; the first call computes the whole group and keeps the others' outputs until they are asked
for (`SiblingGroup.output`). The fused SwiGLU MLP (lora/fused_mlp.py) runs `siblings_forward` and
`siblings_backward` for gate/up inside its own autograd function.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.lora.base import base_input_grad, base_linear
from lorakit.lora.dropout_mask import drop_, dropped, keep_mask
from lorakit.lora.layer import LoraLayer
from lorakit.lora.rank_kernel import rank_gradient, rank_product, suits
from lorakit.lora.variants import LoraAdapter
from lorakit.lora.variants.lora import down_to_rank, grad_of_B
from lorakit.mapped_pages import drop_file_pages
from lorakit.train.fused_norm import restored_input, saved_input

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # read the same input


@torch.no_grad()
def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy `tensors` into one buffer along dim 0 and make each a view of its rows; returns the buffer."""
    buffer = torch.cat([t.detach() for t in tensors])
    old = [(t.data_ptr(), t.numel() * t.element_size())
           for t in tensors if t.device.type == "cpu" and t.is_contiguous()]
    at = 0
    for t in tensors:
        t.data = buffer[at : at + t.shape[0]]
        at += t.shape[0]
    drop_file_pages(old)  # the copies' source pages in a memory-mapped weights file are not read again
    return buffer


@torch.no_grad()
def unpack(tensors: list[torch.Tensor]) -> None:
    """Give each tensor its own storage again (a full-model save refuses tensors that share one)."""
    for t in tensors:
        t.data = t.data.clone()


def siblings_forward(x, weight, bias, adapters, params, training: bool):
    """(y, saved) for y = x W^T + b with each sibling's s_i (drop_i(x) A_i^T) B_i^T added to its slice.

    `weight`/`bias` are the packed (sum out, in) / (sum out,) tensors; `params` is (A_1, B_1, A_2, ...).
    """
    As, Bs = params[0::2], params[1::2]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = base_linear(x, weight, bias)  # (..., sum out)
    keeps: list[torch.Tensor | None] = [None] * len(adapters)
    if not training or all(a.p == 0 for a in adapters):
        u = rank_product(x2, torch.cat(As), suits(weight))  # (N, sum r): one product for every A
    else:  # each sibling its own mask, drawn in order as the separate layers draw them
        us = []
        for i, (adapter, A) in enumerate(zip(adapters, As)):
            if adapter.p > 0:
                keeps[i] = keep_mask(x2, adapter.p)
                us.append((dropped(x2, keeps[i]) @ A.T).div_(1 - adapter.p))
            else:
                us.append(x2 @ A.T)
        u = torch.cat(us, dim=1)
    y2, at, r_at = y.view(-1, y.shape[-1]), 0, 0
    for adapter, A, B in zip(adapters, As, Bs):
        y2[:, at : at + B.shape[0]].addmm_(u[:, r_at : r_at + A.shape[0]], B.T, alpha=adapter.scaling)
        at, r_at = at + B.shape[0], r_at + A.shape[0]
    return y, (u, *keeps)


def siblings_backward(grad, x, weight, adapters, params, saved, need_grad_x: bool):
    """(dL/dx or None, (dL/dA_1, dL/dB_1, ...)) for `siblings_forward`, given g = dL/dy (..., sum out)."""
    As, Bs = params[0::2], params[1::2]
    u, *keeps = saved
    g2 = grad.reshape(-1, grad.shape[-1])  # (N, sum out)
    x2, kernel = x.reshape(-1, x.shape[-1]), suits(weight)
    grads_B, dus, at, r_at = [], [], 0, 0
    for adapter, A, B in zip(adapters, As, Bs):
        g_i = g2[:, at : at + B.shape[0]]  # (N, out_i), a column slice
        u_i = u[:, r_at : r_at + A.shape[0]]
        grads_B.append(grad_of_B(g_i, u_i, kernel).mul_(adapter.scaling))  # (out_i, r)
        dus.append(down_to_rank(g_i, B, kernel).mul_(adapter.scaling))  # (N, r)
        at, r_at = at + B.shape[0], r_at + A.shape[0]
    grad_x = base_input_grad(g2, weight) if need_grad_x else None  # (N, in): every sibling's W in one GEMM
    if all(keep is None for keep in keeps):
        du = torch.cat(dus, dim=1)  # (N, sum r)
        grads_A = list(rank_gradient(x2, du, kernel).split([A.shape[0] for A in As]))
        if grad_x is not None:
            grad_x.addmm_(du, torch.cat(As))
    else:
        grads_A = []
        for adapter, A, du_i, keep in zip(adapters, As, dus, keeps):
            if keep is None:
                grads_A.append(du_i.T @ x2)
                if grad_x is not None:
                    grad_x.addmm_(du_i, A)
            else:  # drop_i(x) recomputed from its mask; 1 / (1 - p) on the small products
                grads_A.append((du_i.T @ dropped(x2, keep)).div_(1 - adapter.p))
                if grad_x is not None:
                    grad_x.add_(drop_(du_i @ A, keep), alpha=1 / (1 - adapter.p))
    grads = [g for pair in zip(grads_A, grads_B) for g in pair]
    return (grad_x.view(x.shape) if grad_x is not None else None), tuple(grads)


class FusedSiblingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, adapters, training: bool, *params):
        y, saved = siblings_forward(x, weight, bias, adapters, params, training)
        ctx.save_for_backward(*saved_input(x), weight, *params, *saved)
        ctx.adapters, ctx.n_params, ctx.x_shape = adapters, len(params), x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        *x_parts, weight = saved[:4]
        x, rest = restored_input(x_parts, ctx.x_shape), saved[4:]
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        grad_x, grads = siblings_backward(grad, x, weight, ctx.adapters, params, saved, ctx.needs_input_grad[0])
        return (grad_x, None, None, None, None, *grads)


class SiblingGroup:
    """LoRA layers on the same input whose frozen weights (and biases) are packed in one buffer."""

    def __init__(self, layers: list[LoraLayer]):
        self.layers = layers
        self.weight = pack([layer.base_layer.weight for layer in layers])  # (sum out, in)
        biases = [layer.base_layer.bias for layer in layers]
        self.bias = pack(biases) if all(b is not None for b in biases) else None
        self.sizes = [layer.out_features for layer in layers]
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # sibling -> (its input, its output)

    def applies(self) -> bool:
        """Every layer on the fused path with one plain LoRA adapter, and its weight still a view of the buffer."""
        at = 0
        for layer, size in zip(self.layers, self.sizes):
            base = layer.base_layer
            if not layer.can_fuse() or type(layer.adapters[layer.active[0]]) is not LoraAdapter:
                return False
            if base.weight.data_ptr() != self.weight[at].data_ptr() or base.weight.shape[0] != size:
                return False
            if (self.bias is None) != (base.bias is None) or (
                base.bias is not None and base.bias.data_ptr() != self.bias[at:].data_ptr()
            ):
                return False
            at += size
        return True

    def adapters_and_params(self) -> tuple[tuple[LoraAdapter, ...], list[torch.Tensor]]:
        adapters = tuple(layer.adapters[layer.active[0]] for layer in self.layers)
        return adapters, [p for adapter in adapters for p in adapter.fused_params()]

    def output(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for x, from one GEMM for the whole group; None where the group does not apply."""
        index = self.layers.index(layer)
        held = self._held.pop(index, None)
        if held is not None and held[0] is x:
            return held[1]
        if not self.applies():
            self._held.clear()
            return None
        adapters, params = self.adapters_and_params()
        y = FusedSiblingLinear.apply(x.to(params[0].dtype), self.weight, self.bias, adapters, layer.training, *params)
        outputs = y.split(self.sizes, dim=-1)
        self._held = {i: (x, out) for i, out in enumerate(outputs) if i != index}
        return outputs[index]

    def release(self) -> None:
        """Give the layers' weights their own storage again and drop the group."""
        self._held.clear()
        unpack([layer.base_layer.weight for layer in self.layers])
        if self.bias is not None:
            unpack([layer.base_layer.bias for layer in self.layers])
        for layer in self.layers:
            layer.sibling_group = None


def _groupable(layers: list) -> bool:
    """Plain float Linear bases on one device and dtype, of the same input width."""
    if not all(isinstance(layer, LoraLayer) and layer.kind == "linear" for layer in layers):
        return False
    bases = [layer.base_layer for layer in layers]
    return (
        all(type(b) is nn.Linear and not b.weight.requires_grad for b in bases)
        and len({(b.weight.dtype, b.weight.device, b.in_features) for b in bases}) == 1
        and len({b.bias is None for b in bases}) == 1
        and all(layer.sibling_group is None for layer in layers)
    )


def fuse_projections(model: nn.Module) -> int:
    """Group q/k/v of every attention block and gate/up of every MLP whose members are LoRA layers; returns
    how many groups."""
    count = 0
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if _groupable(layers):
                group = SiblingGroup(layers)
                for layer in layers:
                    layer.sibling_group = group
                count += 1
    return count


def unfuse_projections(model: nn.Module) -> None:
    """Release every sibling group: separate weights again, each layer on its own path."""
    for module in model.modules():
        group = getattr(module, "sibling_group", None) if isinstance(module, LoraLayer) else None
        if group is not None:
            group.release()
