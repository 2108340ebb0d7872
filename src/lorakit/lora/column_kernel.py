"""Each column's own LoRA term in a feature-major batch, through a small C kernel (column_kernel.c).

A mixed-adapter decode step multiplies the batch's adapters side by side and masks each column to
its own adapter (lora/mixed_features.py): two plain products, but n times the arithmetic a column
needs when n adapters share the batch. On the CPU, where a decode step is bound by that arithmetic,
16 rows over 16 adapters spent a fifth of the step there. The kernel computes, per column b,

    y[:, b] += (s B)_b A_b x[:, b]

reading only its adapter's ranks, on the process's OpenMP threads (torch's own libgomp).

It is compiled once per machine with the system's C compiler (`cc`, or $CC) into the cache folder
(`$LORAKIT_CACHE/kernels`, atomically) and loaded with ctypes. `load()` returns None where it cannot
be built (no compiler, another platform) or where LORAKIT_COLUMN_KERNEL=0; callers then keep the
side-by-side products.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from lorakit.models import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC", "--param=vect-max-peeling-for-alignment=0"]
_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # A, BT, W, out
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # first, count, max_rank
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # y, its strides
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]


def enabled() -> bool:
    """Whether the kernel may be used (LORAKIT_COLUMN_KERNEL=0 turns it off); read on every call."""
    return os.environ.get("LORAKIT_COLUMN_KERNEL", "1") != "0"


@cache
def load():
    """The kernel's C function, built on first use; None where it cannot be built here (logged once)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        library = ctypes.CDLL(str(_built()))  # after torch: its libgomp.so.1 serves the kernel's OpenMP
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("the per-column LoRA kernel could not be built (%s); mixed batches use side-by-side products",
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return None
    function = library.lora_columns
    function.argtypes, function.restype = _ARGS, ctypes.c_int
    return function


def _built() -> Path:
    """The shared library for this source, compiler and CPU, compiled into the cache when missing."""
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"column_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".column_kernel-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves half a library
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), so another CPU sharing the cache builds its own."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


class ColumnTerm:
    """One LoRA layer's factors for the kernel: A (W, in) rows and (s B)^T (W, out) rows, the adapters'
    ranks one under the other, and where each slot's ranks lie (slot 0: no adapter)."""

    def __init__(self, A: torch.Tensor, BT: torch.Tensor, owner: torch.Tensor):
        """A (W, in), BT (W, out) and owner (W,), the slot of each rank row, in ascending order."""
        if len(owner) and bool((owner[1:] < owner[:-1]).any()):
            raise ValueError("ColumnTerm needs each slot's ranks together, slots in ascending order")
        self.A, self.BT = A.contiguous(), BT.contiguous()
        count = torch.bincount(owner.cpu(), minlength=1)  # (slots,): 0 for a slot without ranks here
        # one more slot, past the last, with no ranks: where slots beyond this layer's adapters point
        self.slot_count = torch.cat([count, count.new_zeros(1)])
        self.slot_first = torch.cumsum(self.slot_count, 0) - self.slot_count
        self.max_rank = int(count.max()) if len(owner) else 0

    def columns(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each column's first rank row and rank count, for the columns' slots (n,)."""
        slots = slots.clamp(max=len(self.slot_count) - 1)
        return self.slot_first[slots].contiguous(), self.slot_count[slots].contiguous()


def add_columns(function, x: torch.Tensor, term: ColumnTerm, first: torch.Tensor, count: torch.Tensor,
                y: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """y (out, n) += each column's LoRA term for feature-major x (in, n), in place; fp32 CPU tensors, any
    strides. `work` holds at least n * (in + out) floats."""
    (fan_in, n), fan_out = x.shape, y.shape[0]
    failed = function(
        x.data_ptr(), fan_in, n, x.stride(0), x.stride(1),
        term.A.data_ptr(), term.BT.data_ptr(), term.A.shape[0], fan_out,
        first.data_ptr(), count.data_ptr(), term.max_rank,
        y.data_ptr(), y.stride(0), y.stride(1),
        work.data_ptr(), torch.get_num_threads(),
    )
    if failed:
        raise AssertionError("a column's ranks lie outside its layer's")
    return y
