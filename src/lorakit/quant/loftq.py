"""LoftQ initialisation: A and B from the low-rank part of the quantisation error.

A plain QLoRA adapter starts at zero, so the model starts at Q(W), off the full-precision W by the
whole quantisation error. LoftQ (Li et al., 2023, Algorithm 1) alternates, from B_0 A_0 = 0:

    Q_t       = quantise(W - s B_{t-1} A_{t-1})          the base the layer will hold
    s B_t A_t = best rank-r approximation of W - deq(Q_t)   (truncated SVD)

so deq(Q_T) + s B_T A_T is closer to W than deq(Q(W)) alone. With `loftq_iter: 1` (the default)
the base is the ordinary Q(W), so the saved adapter fits any NF4 load of the same model (PEFT's
`replace_lora_weights_loftq` does the same); more rounds fit W better but move the base away from
Q(W), and the adapter is then exact only on the base this run built.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorakit.config import LoraConfig, QuantizationConfig
from lorakit.lora.layer import LoraAdapter, LoraLayer
from lorakit.quant.bnb import dequantized_weight, quantize_linear

log = logging.getLogger(__name__)


def loftq_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters that ask for LoftQ initialisation, by name."""
    return {n: c for n, c in getattr(model, "lora_configs", {}).items() if c.init_lora_weights == "loftq"}


def _quantize_weight(linear: nn.Linear, weight: torch.Tensor, config: QuantizationConfig) -> nn.Linear:
    """`linear` with `weight` in place of its own, quantised."""
    source = nn.Linear(linear.in_features, linear.out_features, bias=False, device=weight.device)
    source.weight.data.copy_(weight)
    source.bias = linear.bias
    return quantize_linear(source.train(linear.training), config)


@torch.no_grad()
def loftq_decompose(
    linear: nn.Linear, r: int, scaling: float, config: QuantizationConfig, iters: int
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Run LoftQ on one full-precision Linear.

    Returns:
        (the quantised base Q_T, A of shape (r, in), B of shape (out, r)) with s B A the rank-r
        part of W - deq(Q_T).
    """
    weight = linear.weight.detach().float()  # (out, in)
    low_rank = torch.zeros_like(weight)
    for _ in range(iters):
        quantised = _quantize_weight(linear, weight - low_rank, config)
        error = weight - dequantized_weight(quantised)  # (out, in)
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        root = torch.sqrt(S[:r] / scaling)  # split each singular value evenly between A and B
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)
        low_rank = scaling * (B @ A)
    return quantised, A, B


def loftq_layer(layer: LoraLayer, config: QuantizationConfig, loftq: dict[str, LoraConfig]) -> nn.Linear:
    """Quantise `layer`'s base with LoftQ for its first LoftQ adapter; set that adapter's A and B."""
    names = [n for n in loftq if n in layer.adapters]
    if not names:
        return quantize_linear(layer.base_layer, config)
    if len(names) > 1:
        log.warning("LoftQ: layer has adapters %s; only '%s' is initialised from the base", names, names[0])
    adapter: LoraAdapter = layer.adapters[names[0]]
    iters = loftq[names[0]].loftq_iter
    quantised, A, B = loftq_decompose(layer.base_layer, adapter.r, adapter.scaling, config, iters)
    adapter.A.data.copy_(A)
    adapter.B.data.copy_(B)
    return quantised
