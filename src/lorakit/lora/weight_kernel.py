"""A decode step's fp32 base products through lorakit's own C kernel (weight_kernel.c).

`product(x, weight)` computes W x for a feature-major x (in, n), as torch.mm does, reading the weight
once, front to back, 16 columns at a time. lora/base.py's `decode_layouts` times it beside the BLAS
layouts once per process and uses it for the column counts where it is faster. It is compiled once per
machine (lorakit/native.py); `load()` returns None where it cannot be built, and LORAKIT_WEIGHT_KERNEL=0
leaves it out.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from lorakit import native

SOURCE = Path(__file__).with_suffix(".c")
# FMA contraction on: each output is one multiply-add chain over the inputs
FLAGS = [*native.FLAGS, "-ffp-contract=fast"]
_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]  # W, x, y, out, in, n, pad


def enabled() -> bool:
    """Whether the kernel may be used (LORAKIT_WEIGHT_KERNEL=0 leaves it out)."""
    return os.environ.get("LORAKIT_WEIGHT_KERNEL", "1") != "0"


@cache
def load():
    """The kernel's C function, built on first use; None where it cannot be built here (logged once)."""
    library = native.load_library(SOURCE, FLAGS, what="the decode-step product kernel (BLAS serves instead)")
    if library is None:
        return None
    function = library.weight_product
    function.argtypes, function.restype = _ARGS, None
    return function


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W x (out, n) for fp32 CPU x (in, n) and weight (out, in); x is made contiguous (a copy if it is not)."""
    function = load()
    if function is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("the product kernel takes fp32 CPU tensors, and needs a C compiler")
    (fan_in, n), (fan_out, weight_in) = x.shape, weight.shape
    if weight_in != fan_in:
        raise ValueError(f"weight {tuple(weight.shape)} does not take x {tuple(x.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(fan_out, n)
    pad = torch.empty(16 * fan_in) if n % 16 else out  # a last partial block's padded copy (this call's own)
    if n and fan_out:
        function(weight.data_ptr(), x.data_ptr(), out.data_ptr(), fan_out, fan_in, n, pad.data_ptr(),
                 torch.get_num_threads())
    return out
