"""Plain LoRA (and rsLoRA): the adapter every variant starts from.

    h = W x + b + s B A drop(x)       A: (r, in), B: (out, r); s = alpha / r (rsLoRA: alpha / sqrt(r))

B starts at zero, so a fresh adapter leaves the model unchanged. The adapter owns its term: the
layer, the fused training path, mixed-adapter serving and merging ask it, and never read A or B.
What a variant answers (each method's docstring says how plain LoRA does it):

    options(config)                its own constructor arguments from a LoraConfig (most have none)
    initialize(layer, init)        its tensors for a new adapter on `layer`
    delta_weight()                 the low-rank update s B A, (out, in)
    low_rank_factors()             (A, B, s) when s B A is the whole update (weighted merges), else None
    merge(layer) / unmerge(layer)  fold itself into the base weight / take itself out again
    output(layer, x, result)       the layer's output, given the base's output `result`
    fused_params() / fused_forward / fused_backward   the lean training path (lora/fused.py)
    row_factors(layer)             per-row serving (lora/mixed.py): A, B, s and an output scale
    loraplus_params()              what LoRA+ trains at the higher rate
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.base import base_input_grad, base_linear
from lorakit.lora.dropout_mask import drop_, dropped, keep_mask
from lorakit.lora.inits import initialize
from lorakit.lora.rank_kernel import rank_gradient, rank_product, suits


class LoraAdapter(nn.Module):
    """One named adapter: A, B, their scale and the dropout on the adapter's input."""

    KINDS = ("linear", "conv1d", "embedding")  # base kinds it can sit on
    PEFT_KEYS: dict[str, str] = {}  # a variant's own parameters -> their key suffix in PEFT's files

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool
    ):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, r))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def options(cls, config) -> dict:
        """The variant's own constructor arguments, read off a LoraConfig (plain LoRA has none)."""
        return {}

    @property
    def p(self) -> float:
        """The dropout probability (0 when there is none)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def initialize(self, layer, init: bool | str) -> None:
        """A and B as PEFT's `init_lora_weights` says (lora/inits.py)."""
        initialize(layer, self, init)

    # -- the update as a weight -------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update s B A."""
        return (self.B @ self.A) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when the whole update is s B A (weighted merges combine these), else None."""
        return self.A, self.B, self.scaling

    def merge(self, layer) -> None:
        """W += s B A."""
        layer.add_to_weight(self.delta_weight())

    def unmerge(self, layer) -> None:
        """W -= s B A."""
        layer.add_to_weight(-self.delta_weight())

    # -- the term in a forward pass ---------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s B A drop(x) for a linear-shaped input."""
        return (self.dropout(x) @ self.A.T) @ self.B.T * self.scaling  # (..., in) -> (..., r) -> (..., out)

    def term(self, layer, x: torch.Tensor) -> torch.Tensor:
        """s B A drop(x); for an embedding, the rows of A^T the ids pick, times s B^T."""
        if layer.kind == "embedding":
            base = layer.base_layer
            rows = F.embedding(
                x, self.A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (..., r)
            return rows @ self.B.T * self.scaling
        return self(x.to(self.A.dtype))

    def output(self, layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + s B A drop(x)."""
        return result + self.term(layer, x).to(result.dtype)

    # -- the lean training path (lora/fused.py) ---------------------------------------------
    def fused_params(self) -> tuple[torch.Tensor, ...]:
        """The trainable tensors the fused path returns gradients for, in this order."""
        return self.A, self.B

    def fused_forward(self, x, weight, bias, params, training: bool) -> tuple[torch.Tensor, tuple]:
        """(y, what backward needs) for y = x W^T + b + s (drop(x) A^T) B^T; W is (out, in)."""
        A, B = params
        y, u, keep = lora_forward(x, weight, bias, A, B, self.scaling, self.p, training)
        return y, (u, keep)

    def fused_backward(self, grad, x, weight, params, saved, need_grad_x: bool) -> tuple:
        """(dL/dx or None, (dL/dA, dL/dB)) given g = dL/dy."""
        A, B = params
        u, keep = saved
        grad_x, grad_A, grad_B = lora_backward(grad, x, weight, A, B, u, keep, self.scaling, self.p, need_grad_x)
        return grad_x, (grad_A, grad_B)

    # -- serving ----------------------------------------------------------------------------
    def row_factors(self, layer) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """(A (r, in), B (out, r), s, output scale) with the row's output = scale * base + s B A x;
        plain LoRA has no output scale (None)."""
        return self.A.detach(), self.B.detach(), self.scaling, None

    def loraplus_params(self) -> list[nn.Parameter]:
        """LoRA+ trains B at `loraplus_lr_ratio` times the rate of A."""
        return [self.B]


def lora_forward(x, weight, bias, A, B, scaling: float, p: float, training: bool):
    """y = x W^T + b + s (drop(x) A^T) B^T; returns (y, u, keep) where u = drop(x) A^T, keep the bool mask.

    Plain autograd would keep the dropped-out copy of x (a full activation per layer when dropout is
    on); this keeps x, the r-wide u and a one-byte mask, and backward recomputes drop(x).
    """
    keep = None
    if p > 0 and training:
        keep = keep_mask(x, p)  # bool: a quarter of the memory of the dropped copy
        u = (dropped(x, keep) @ A.T).div_(1 - p)  # (..., r); the inverted-dropout scale on the r-wide product
    else:
        u = rank_product(x.reshape(-1, x.shape[-1]), A, suits(weight))
        u = u.view(*x.shape[:-1], A.shape[0])  # (..., r)
    y = base_linear(x, weight, bias)
    # The LoRA term rides on the up-projection's GEMM (addmm_ with alpha = s): no (tokens x out)
    # temporaries for s * (u B^T) and the sum, each a full pass over the output.
    y.view(-1, y.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), B.T, alpha=scaling)
    return y, u, keep


def grad_of_B(grad: torch.Tensor, u: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """grad^T u, (out, r), for grad (N, out) and the r-wide u (N, r), computed as (u^T grad)^T: through the rank
    kernel where it applies (lora/rank_kernel.py); MKL took 3-4x as long the first way round."""
    return rank_gradient(grad, u, kernel).T.contiguous()


def down_to_rank(grad: torch.Tensor, B: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """grad B, (..., r), for grad (..., out) and B (out, r), through the rank kernel (lora/rank_kernel.py)."""
    return rank_product(grad.reshape(-1, grad.shape[-1]), B.T, kernel).view(*grad.shape[:-1], B.shape[1])


def lora_backward(grad, x, weight, A, B, u, keep, scaling: float, p: float, need_grad_x: bool = True):
    """(dL/dx or None, dL/dA, dL/dB) for `lora_forward`, given g = dL/dy:

        dL/dB = s g^T u            du = s g B            dL/dA = du^T drop(x)
        dL/dx = g W + (du A) * mask / (1 - p)
    """
    # The scale goes on the r-wide products, never on a (tokens x features) tensor.
    g2, kernel = grad.reshape(-1, grad.shape[-1]), suits(weight)  # (N, out)
    grad_B = grad_of_B(g2, u.reshape(-1, u.shape[-1]), kernel).mul_(scaling)  # (out, r)
    du = down_to_rank(grad, B, kernel).mul_(scaling)  # (..., r)
    du2 = du.reshape(-1, du.shape[-1])
    if keep is None:
        grad_A = rank_gradient(x.reshape(-1, x.shape[-1]), du2, kernel)  # (r, in)
    else:  # drop(x) recomputed from the mask; 1 / (1 - p) applied to the (r, in) product
        grad_A = (du2.T @ dropped(x, keep).reshape(-1, x.shape[-1])).div_(1 - p)
    grad_x = None
    if need_grad_x:
        grad_x = base_input_grad(grad, weight)  # (..., in), contiguous
        if keep is None:  # du A added by the GEMM itself
            grad_x.view(-1, grad_x.shape[-1]).addmm_(du2, A)
        else:
            grad_x.add_(drop_(du @ A, keep), alpha=1 / (1 - p))
    return grad_x, grad_A, grad_B
