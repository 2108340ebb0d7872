"""fp32 products of many rows (a prompt's tokens, a training step's) through oneDNN, where it is faster than
torch's default.

PyTorch's CPU builds multiply fp32 through MKL, which runs its AVX2 code on AMD CPUs: on a 2-core EPYC
with AVX-512 it reached about 210 GFLOP/s at a SmolLM2-135M prompt's shapes (576 tokens), oneDNN's
fp32 kernels, which ship in the same build (the op inductor uses for linear layers), 480-520. Which is
faster depends on the CPU, so `faster()` times both at a prompt-sized product, once per machine (the answer
kept by lorakit/machine_choices.py, so that every process computes alike), and `linear` and `input_grad` are
used only where oneDNN won by a margin. Never under autograd (the op has no
backward): a fused training path calls them inside its own autograd function.
The results equal F.linear's to float rounding. LORAKIT_ONEDNN_LINEAR=0 leaves it out.
"""

from __future__ import annotations

import functools
import os
from functools import cache

import torch
import torch.nn.functional as F

from lorakit.lora.turns import best_times
from lorakit.machine_choices import remembered


def available() -> bool:
    """Whether this build has oneDNN's linear op (and LORAKIT_ONEDNN_LINEAR is not 0)."""
    return (
        os.environ.get("LORAKIT_ONEDNN_LINEAR", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b through oneDNN for fp32 CPU tensors, x (..., in)."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight.contiguous(), bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g W for fp32 CPU tensors, g (..., out) and W (out, in): `linear` by W^T, read in place (no copy of W)."""
    rows = grad.reshape(-1, grad.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight.t(), None, "none", [], "")
    return out.view(*grad.shape[:-1], weight.shape[1])


@cache
def faster() -> bool:
    """Whether oneDNN multiplies a prompt-sized fp32 product (512 rows by a 2048 x 512 weight and its
    transpose) faster than F.linear here by a margin: timed once per machine (`measure_faster`), read once per
    process."""
    return available() and remembered("onednn-linear-faster", measure_faster)


def measure_faster(rounds: int = 5, margin: float = 0.1) -> bool:
    """Whether oneDNN is at least `margin` faster at that product, the two taking turns for `rounds` rounds
    after a warm-up of each (about 0.1 s)."""
    if not available():
        return False
    x = {512: torch.full((512, 512), 0.5), 2048: torch.full((512, 2048), 0.5)}
    weights = [torch.full((2048, 512), 1.0 / 2048), torch.full((512, 2048), 1.0 / 2048)]

    def products(function) -> None:
        for weight in weights:
            function(x[weight.shape[1]], weight, None)

    try:
        ways = {"mkl": functools.partial(products, F.linear), "onednn": functools.partial(products, linear)}
        best_times(ways, 1)  # warm-up: oneDNN's first call builds its kernels
        best = best_times(ways, rounds)
    except RuntimeError:  # the op exists but refuses these tensors in this build
        return False
    return best["onednn"] < (1 - margin) * best["mkl"]
