"""DoRA, weight-decomposed LoRA (Liu et al., 2024): the update's direction from LoRA, its length learnt apart.

    W' = m * (W + s B A) / ||W + s B A||        m: (out,), one magnitude per output feature
    h  = W x + b + (W' - W) drop(x) = W x + b + (c - 1) W drop(x) + c s B A drop(x),   c = m / ||W + s B A||

The norm is taken per output feature (a row of the (out, in) weight; the paper's column norm) and,
as the paper's section 4.3 and PEFT do, treated as a constant: it gets no gradient. m starts at that
norm, so a new adapter changes nothing. Without dropout h = c (W x + s B A x) + b: one matmul with W,
as plain LoRA. With dropout the update sees the dropped-out input, as in the paper's code and PEFT
(`dora_dropout="full"`), which costs a second matmul with W (forward and backward). With
`dora_dropout="lowrank"` (torchtune's DoRALinear) only the low-rank branch sees it:

    h = c W x + b + c s B A drop(x)

one matmul with W each way, as without dropout; the saved adapter is the same PEFT DoRA adapter.

The norm depends only on W, A and B, so it is computed once per value of them (at most once per
optimizer step: gradient accumulation, gradient checkpointing's second forward and decoding reuse
it) and never for the gradient; a quantised base is dequantised only then. On disk m is PEFT's
`lora_magnitude_vector`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.base import is_quantized
from lorakit.lora.dropout_mask import dropped, keep_mask
from lorakit.lora.rank_kernel import suits
from lorakit.lora.variants.lora import LoraAdapter, down_to_rank, lora_backward, lora_forward


class DoraAdapter(LoraAdapter):
    """LoRA's A and B for the direction, and a trained magnitude per output feature."""

    KINDS = ("linear", "conv1d")
    PEFT_KEYS = {"magnitude": "lora_magnitude_vector"}
    DROPOUT_MODES = ("full", "lowrank")  # what dropout reaches: the whole update (PEFT) or s B A only

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool,
                 dora_dropout: str = "full"):
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora)
        if dora_dropout not in self.DROPOUT_MODES:
            raise ValueError(f"dora_dropout: given {dora_dropout!r}, expected one of {', '.join(self.DROPOUT_MODES)}")
        self.dora_dropout = dora_dropout
        self.magnitude = nn.Parameter(torch.ones(out_features))  # (out,); set from the weight in initialize
        self._norm_key: tuple | None = None  # what the cached norm was computed from
        self._norm: torch.Tensor | None = None
        self._merged_norm: torch.Tensor | None = None  # the norm at merge time, which unmerge divides by

    @classmethod
    def options(cls, config) -> dict:
        """`lora.dora_dropout`: where the dropout applies (a training setting; PEFT's file has no place for it)."""
        return {"dora_dropout": config.dora_dropout}

    @property
    def _full_dropout(self) -> bool:
        """Dropout is on and reaches the (c - 1) W term too, which then needs W drop(x): a second matmul."""
        return self.training and self.p > 0 and self.dora_dropout == "full"

    @torch.no_grad()
    def initialize(self, layer, init: bool | str) -> None:
        """A and B as plain LoRA starts them, then m = ||W + s B A|| (after PiSSA/OLoRA moved part of W)."""
        super().initialize(layer, init)
        self.magnitude.copy_(self.weight_norm(layer.base_layer.weight, layer.weight_as_out_in))

    # -- the norm -----------------------------------------------------------------------------
    def weight_norm(self, stored: torch.Tensor, weight_of) -> torch.Tensor:
        """||W + s B A|| per output feature, (out,), detached. `stored` is the base's weight as stored
        (what the cache is keyed on), `weight_of()` gives W as (out, in), dequantised if need be;
        it is called only when W, A or B changed since the last call."""
        try:
            key = (stored.data_ptr(), stored._version, self.A.data_ptr(), self.A._version,
                   self.B.data_ptr(), self.B._version, torch.is_inference_mode_enabled())
        except RuntimeError:  # inference tensors keep no version counter: no caching
            key = None
        if key is None or key != self._norm_key:
            self._norm = _row_norm(weight_of(), self.A.detach(), self.B.detach(), self.scaling)
            self._norm_key = key
        return self._norm

    def _scale(self, layer) -> torch.Tensor:
        """c = m / ||W + s B A||, (out,); m keeps its gradient."""
        return self.magnitude / self.weight_norm(layer.base_layer.weight, layer.weight_as_out_in)

    # -- the update as a weight -----------------------------------------------------------------
    def low_rank_factors(self) -> None:
        """None: the update is more than s B A."""
        return None

    @torch.no_grad()
    def merge(self, layer) -> None:
        """W <- c (W + s B A), with the norm of the base weight without the adapters merged before
        this one (as the forward pass sees it)."""
        merged_before = list(layer.merged)
        layer.unmerge()
        norm = _row_norm(layer.weight_as_out_in(), self.A, self.B, self.scaling)
        layer.merge(merged_before)
        self._merged_norm = norm
        weight = layer.weight_as_out_in().to(self.A.dtype)
        c = (self.magnitude / norm)[:, None]  # (out, 1)
        layer.add_to_weight(c * (weight + self.delta_weight()) - weight)

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        """W <- W' / c - s B A, with c from the merge."""
        weight = layer.weight_as_out_in().to(self.A.dtype)
        c = (self.magnitude / self._merged_norm)[:, None]
        layer.add_to_weight(weight / c - self.delta_weight() - weight)
        self._merged_norm = None

    # -- the term in a forward pass -------------------------------------------------------------
    def output(self, layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (c - 1) W drop(x) + c s B A drop(x) ('full'), or result + (c - 1) W x + c s B A drop(x)
        ('lowrank'); W x is read off `result` whenever the (c - 1) term sees the undropped input."""
        c = self._scale(layer)  # (out,)
        xd = self.dropout(x.to(self.A.dtype))
        lora = (xd @ self.A.T) @ self.B.T * self.scaling  # (..., out)
        if self._full_dropout:
            base = _base_output(layer, xd)
        else:
            bias = getattr(layer.base_layer, "bias", None)
            base = result if bias is None else result - bias
        return result + ((c - 1) * base.to(c.dtype) + c * lora).to(result.dtype)

    # -- the lean training path (lora/fused.py) -------------------------------------------------
    def fused_params(self) -> tuple[torch.Tensor, ...]:
        return self.A, self.B, self.magnitude

    def fused_forward(self, x, weight, bias, params, training: bool) -> tuple[torch.Tensor, tuple]:
        """y = c z + b with z = x W^T + s u B^T, u = drop(x) A^T, without dropout and for 'lowrank' (one
        matmul with W; the mask only on the r-wide u); with 'full' dropout, y = x W^T + b + (c - 1) z + s u B^T
        where z = drop(x) W^T + s u B^T. Keeps x, u, z, c, the norm and the mask."""
        A, B, magnitude = params
        norm = self.weight_norm(weight, lambda: weight)
        c = magnitude / norm  # (out,)
        if not (training and self.p > 0 and self.dora_dropout == "full"):
            z, u, keep = lora_forward(x, weight, None, A, B, self.scaling, self.p, training)  # x W^T + s u B^T
            y = z * c if bias is None else torch.addcmul(bias, z, c)
            return y, (u, z, c, norm) if keep is None else (u, z, c, norm, keep)
        keep = keep_mask(x, self.p)
        z, u, _ = lora_forward(dropped(x, keep).div_(1 - self.p), weight, None, A, B, self.scaling, 0.0, False)
        y = F.linear(x, weight, bias).addcmul_(z, c - 1)
        y.view(-1, y.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), B.T, alpha=self.scaling)
        return y, (u, z, c, norm, keep)

    def fused_backward(self, grad, x, weight, params, saved, need_grad_x: bool) -> tuple:
        """dL/dm = sum over tokens of g z / norm; A and B see g c, as plain LoRA sees g (and x, too, sees
        g c as plain LoRA's g: no dropout, or 'lowrank'); with 'full' dropout
        dL/dx = g W + mask / (1 - p) ((g (c - 1)) W + s (g c) B A)."""
        A, B, _ = params
        u, z, c, norm, *keep = saved
        grad_m = (grad * z).reshape(-1, z.shape[-1]).sum(0) / norm
        scaled = grad * c  # (..., out)
        if not keep or self.dora_dropout == "lowrank":
            grad_x, grad_A, grad_B = lora_backward(
                scaled, x, weight, A, B, u, keep[0] if keep else None, self.scaling, self.p, need_grad_x
            )
            return grad_x, (grad_A, grad_B, grad_m)
        keep, p = keep[0], self.p
        _, grad_A, grad_B = lora_backward(scaled, dropped(x, keep), weight, A, B, u, None, self.scaling, 0.0, False)
        grad_A.div_(1 - p)
        grad_x = None
        if need_grad_x:
            inner = (grad * (c - 1)) @ weight  # (..., in)
            du = down_to_rank(scaled, B, suits(weight)).mul_(self.scaling)  # (..., r)
            inner.view(-1, inner.shape[-1]).addmm_(du.reshape(-1, du.shape[-1]), A)
            grad_x = (grad @ weight).add_(inner.mul_(keep), alpha=1 / (1 - p))
        return grad_x, (grad_A, grad_B, grad_m)

    # -- serving --------------------------------------------------------------------------------
    def row_factors(self, layer) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """A, c B, s and the output scale c: the row's output is c (W x) + b + s (c B) A x."""
        c = self._scale(layer).detach()
        return self.A.detach(), c[:, None] * self.B.detach(), self.scaling, c

    def loraplus_params(self) -> list[nn.Parameter]:
        """B and the magnitude at the higher rate (PEFT's LoRA+ puts every 1-D adapter tensor with B)."""
        return [self.B, self.magnitude]


@torch.no_grad()
def _row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| over each row of the (out, in) weight; in the adapter's dtype, never autocast."""
    with torch.autocast(weight.device.type, enabled=False):
        return torch.linalg.vector_norm(torch.addmm(weight.to(A.dtype), B, A, alpha=scaling), dim=1)


def _base_output(layer, x: torch.Tensor) -> torch.Tensor:
    """W x without the bias (a quantised base runs its own kernel)."""
    if is_quantized(layer.base_layer):
        out = layer.base_layer(x)
        bias = layer.base_layer.bias
        return (out if bias is None else out - bias).to(x.dtype)
    return F.linear(x, layer.weight_as_out_in().to(x.dtype))
