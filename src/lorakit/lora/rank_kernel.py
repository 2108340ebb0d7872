"""LoRA's rank-wide products on the CPU through lorakit's own C kernel (rank_kernel.c).

A training step of a LoRA layer multiplies by its ranks four times: u = x A^T and, backward, du = g B,
dL/dB = g^T u and dL/dA = du^T x, each with one dimension of r (8, or a sibling group's ranks side by side).
MKL and oneDNN are tuned for wide products and ran these at 20-55 GFLOP/s on a 2-core EPYC (N 474,
K 576 to 1536, r 8); the kernel runs them at about twice that. `rank_product(x, A)` = x A^T and
`rank_gradient(g, u)` = u^T g go through it for fp32 CPU tensors outside autograd (a fused path's own
forward and backward), and through torch otherwise; results equal torch's to float rounding (other
sums), and do not depend on the thread count. It is compiled once per machine (lorakit/native.py);
LORAKIT_RANK_KERNEL=0 leaves it out.

Callers pass `kernel=suits(weight)`: a layer whose frozen weight is kept in a half type (train.half_base)
keeps torch's products. There the kernel's other rounding grows, through the half base, into a different
trained model, and over nine seeds of the ROS 2 job the valid loss (the split that chooses) came out lower
without it in eight; it saves only about 6% of such a step.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from lorakit import native

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = [*native.FLAGS, "-ffp-contract=fast"]  # each vector of sums one multiply-add chain
# wide, its rows, its row stride, the rank-wide operand, r, the result, threads
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_void_p, ctypes.c_int]


def enabled() -> bool:
    """Whether the kernel may be used (LORAKIT_RANK_KERNEL=0 leaves it out); read on every call."""
    return os.environ.get("LORAKIT_RANK_KERNEL", "1") != "0"


@cache
def load():
    """The kernel's library, built on first use; None where it cannot be built here (logged once)."""
    library = native.load_library(SOURCE, FLAGS, what="the rank-wide product kernel (torch serves instead)")
    if library is not None:
        for function in (library.rank_product, library.rank_gradient):
            function.argtypes, function.restype = _ARGS, None
    return library


def suits(weight: torch.Tensor) -> bool:
    """Whether a layer with this frozen weight takes the kernel: an fp32 weight, not a half base's."""
    return weight.dtype == torch.float32


def _applies(wide: torch.Tensor, narrow: torch.Tensor) -> bool:
    """Whether the kernel takes wide (N, K) and the rank-wide operand: fp32 CPU tensors outside autograd, wide's
    rows strided but each contiguous, and the library built."""
    return (
        wide.dtype == narrow.dtype == torch.float32 and wide.device.type == narrow.device.type == "cpu"
        and wide.dim() == narrow.dim() == 2 and wide.stride(1) == 1 and wide.shape[0] > 0
        and not (torch.is_grad_enabled() and (wide.requires_grad or narrow.requires_grad))
        and enabled() and load() is not None
    )


def rank_product(x: torch.Tensor, A: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """x A^T, (N, r), for x (N, K) and A (r, K) (through torch where kernel is False or the kernel does not
    apply, by a contiguous A, which BLAS takes about twice as fast as a transposed view at LoRA's shapes)."""
    if not (kernel and _applies(x, A)) or A.shape[1] != x.shape[1]:
        return x @ A.contiguous().T
    A = A.contiguous()
    out = torch.empty(x.shape[0], A.shape[0])
    load().rank_product(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), A.data_ptr(), A.shape[0],
                        out.data_ptr(), torch.get_num_threads())
    return out


def rank_gradient(g: torch.Tensor, u: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """u^T g, (r, M), for g (N, M) and u (N, r) (through torch where kernel is False)."""
    if not (kernel and _applies(g, u)) or u.shape[0] != g.shape[0]:
        return u.T @ g
    u = u.contiguous()
    out = torch.empty(u.shape[1], g.shape[1])
    load().rank_gradient(g.data_ptr(), g.shape[0], g.shape[1], g.stride(0), u.data_ptr(), u.shape[1],
                         out.data_ptr(), torch.get_num_threads())
    return out
