"""A decode step's RMSNorm and rotary embedding in one C call each (step_ops.c), where it is built.

At one to a few rows a decode step's time outside its products goes to many small torch operations, each
with its dispatch and Python: an RMSNorm is seven of them, a rotary embedding (with the view and permute
before it) nine. `rms_norm` and `rotate` compute the same expressions (infer/decode_step.py's) in one call
each on fp32 CPU tensors; elsewhere, or where no C compiler is, they return None and the step computes them
with torch. LORAKIT_STEP_OPS=0 leaves them out.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from lorakit import native

SOURCE = Path(__file__).with_suffix(".c")


@cache
def _library():
    if os.environ.get("LORAKIT_STEP_OPS", "1") == "0":
        return None
    library = native.load_library(SOURCE, what="the decode step's RMSNorm and rotary kernels (torch serves instead)")
    if library is not None:
        library.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
        library.rotate.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        library.rms_norm.restype = library.rotate.restype = None
    return library


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors that no gradient is asked of (the kernels have no backward)."""
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight[:, None] * (x / sqrt(mean(x^2 over the features) + eps)) for feature-major x (H, B), or None where the
    kernel does not serve (not fp32 CPU, under autograd, not built)."""
    library = _library()
    if library is None or not _fp32_cpu(x, weight) or x.dim() != 2 or weight.shape != (x.shape[0],):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    library.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def rotate(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The rotary embedding of a projection's feature-major output x (heads * head_dim, N) as (N, heads, head_dim):
    x cos + rotate_half(x) sin, cos and sin (N, 1, head_dim) or (N, head_dim); None where the kernel does not serve."""
    library = _library()
    n = x.shape[-1]
    if (library is None or not _fp32_cpu(x, cos, sin) or x.shape != (heads * head_dim, n) or head_dim % 2
            or cos.numel() != n * head_dim or sin.numel() != n * head_dim):
        return None
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty(n, heads, head_dim)
    library.rotate(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), heads, head_dim, n)
    return out
