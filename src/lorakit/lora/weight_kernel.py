"""A decode step's fp32 base products through lorakit's own C kernel (weight_kernel.c).

`product(x, weight)` computes W x for a feature-major x (in, n), as torch.mm does, reading the weight
once, front to back, 16 columns at a time; `few_columns_product` the same for 1 to 4 columns (a decode
step of a few rows, where the 16-column loop would do up to 16 times the arithmetic), 16 inputs of a row
against 16 of each column at a time; `int8_product` the same for an int8 weight with one scale per output
(infer/int8_weights.py), its weights widened to fp32 as they are read. lora/base.py's `decode_layouts`
times both fp32 products beside the BLAS layouts once per process and uses each for the column counts
where it is the fastest (`int8_kernel_rows` likewise for int8). It is compiled once per
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
def _library():
    library = native.load_library(SOURCE, FLAGS, what="the decode-step product kernel (BLAS serves instead)")
    if library is not None:
        library.weight_product.argtypes, library.weight_product.restype = _ARGS, None
        library.int8_weight_product.argtypes, library.int8_weight_product.restype = [ctypes.c_void_p, *_ARGS], None
        library.w8a8_product.argtypes, library.w8a8_product.restype = [ctypes.c_void_p, *_ARGS], None
        few = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]  # W, xt, y, out, in, n, threads
        library.few_columns_product.argtypes, library.few_columns_product.restype = few, None
    return library


def load():
    """The kernel's C function, built on first use; None where it cannot be built here (logged once)."""
    library = _library()
    return None if library is None else library.weight_product


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


FEW_COLUMNS = 4  # the most columns `few_columns_product` takes (weight_kernel.c's FEW)


def few_columns_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W x (out, n) for fp32 CPU x (in, n) with 1 <= n <= FEW_COLUMNS and weight (out, in), the weight read once; each
    output summed in 16 lanes and then across them (as BLAS sums, not in input order)."""
    library = _library()
    if library is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("the product kernel takes fp32 CPU tensors, and needs a C compiler")
    (fan_in, n), (fan_out, weight_in) = x.shape, weight.shape
    if weight_in != fan_in or not 1 <= n <= FEW_COLUMNS:
        raise ValueError(f"weight {tuple(weight.shape)} does not take x {tuple(x.shape)} (1 to {FEW_COLUMNS} columns)")
    columns, weight = x.t().contiguous(), weight.contiguous()  # (n, in): one column's features after another
    out = torch.empty(fan_out, n)
    if fan_out:
        library.few_columns_product(weight.data_ptr(), columns.data_ptr(), out.data_ptr(), fan_out, fan_in, n,
                                    torch.get_num_threads())
    return out


def int8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """diag(scales) Q x (out, n) for fp32 CPU x (in, n), an int8 weight Q (out, in) whose `in` is a multiple of 16 and
    fp32 scales (out,): each column's sums over the inputs in fp32, in order, then scaled."""
    library = _library()
    if (library is None or x.dtype != torch.float32 or weight.dtype != torch.int8 or scales.dtype != torch.float32
            or x.device.type != "cpu"):
        raise ValueError("the int8 product kernel takes fp32 x, an int8 weight and fp32 scales on the CPU")
    (fan_in, n), (fan_out, weight_in) = x.shape, weight.shape
    if weight_in != fan_in or fan_in % 16 or scales.shape != (fan_out,):
        raise ValueError(f"weight {tuple(weight.shape)} does not take x {tuple(x.shape)} (in a multiple of 16)")
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    out = torch.empty(fan_out, n)
    pad = torch.empty(16 * fan_in) if n % 16 else out
    if n and fan_out:
        library.int8_weight_product(weight.data_ptr(), scales.data_ptr(), x.data_ptr(), out.data_ptr(), fan_out,
                                    fan_in, n, pad.data_ptr(), torch.get_num_threads())
    return out


W8A8_BLOCK = 32  # inputs per activation scale in `w8a8_product` (llama.cpp's q8_0 block)


def w8a8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """diag(scales) Q xq (out, n) for fp32 CPU x (in, n) rounded to int8 per column and block of 32 inputs (d = max |x|
    / 127, q = round(x / d)), an int8 weight Q (out, in) with `in` a multiple of 32, and fp32 scales (out,): each
    block's products summed exactly in int32 (AVX-512 VNNI where the CPU has it), scaled by d into fp32 sums."""
    library = _library()
    if (library is None or x.dtype != torch.float32 or weight.dtype != torch.int8 or scales.dtype != torch.float32
            or x.device.type != "cpu"):
        raise ValueError("the w8a8 product kernel takes fp32 x, an int8 weight and fp32 scales on the CPU")
    (fan_in, n), (fan_out, weight_in) = x.shape, weight.shape
    if weight_in != fan_in or fan_in % W8A8_BLOCK or scales.shape != (fan_out,):
        raise ValueError(f"weight {tuple(weight.shape)} does not take x {tuple(x.shape)} (in a multiple of 32)")
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    out = torch.empty(fan_out, n)
    blocks = -(-n // 16)
    few = n * (fan_in * 5 + fan_in // W8A8_BLOCK * 8) if n <= FEW_COLUMNS else 0  # the few-columns loop's
    work = torch.empty(max(blocks * (fan_in * 16 + fan_in // W8A8_BLOCK * 16 * 8), few), dtype=torch.uint8)
    if n and fan_out:
        library.w8a8_product(weight.data_ptr(), scales.data_ptr(), x.data_ptr(), out.data_ptr(), fan_out, fan_in, n,
                             work.data_ptr(), torch.get_num_threads())
    return out
