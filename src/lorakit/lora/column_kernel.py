"""Each column's own LoRA term in a feature-major batch, through a small C kernel (column_kernel.c).

A mixed-adapter decode step multiplies the batch's adapters side by side and masks each column to
its own adapter (lora/mixed_features.py): two plain products, but n times the arithmetic a column
needs when n adapters share the batch. On the CPU, where a decode step is bound by that arithmetic,
16 rows over 16 adapters spent a fifth of the step there. The kernel computes, per column b,

    y[:, b] += (s B)_b A_b x[:, b]

reading only its adapter's ranks, on the process's OpenMP threads (torch's own libgomp). For a decode
step's contiguous columns over up to a few groups of 16 adapters, `add_lanes` computes the same terms
from the factors laid out by slot lanes (`ColumnTerm.lanes`), reading them front to back as full
vectors, with no gather of the inputs and no transpose of the outputs.

It is compiled once per machine with the system's C compiler (`cc`, or $CC) into the cache folder
(`$LORAKIT_CACHE/kernels`, atomically) and loaded with ctypes. `load()` returns the library, or None where
it cannot be built (no compiler, another platform); `enabled()` is false where LORAKIT_COLUMN_KERNEL=0.
Callers keep the side-by-side products then.
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
_COLUMNS_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # A, BT, W, out
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # first, count, max_rank
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # y, its strides
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]
_LANES_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # AL, BL, groups, R, out
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # lane, y, its feature stride
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]
LANES = 16  # slots a lane group holds: one 16-float vector


def enabled() -> bool:
    """Whether the kernel may be used (LORAKIT_COLUMN_KERNEL=0 turns it off); read on every call."""
    return os.environ.get("LORAKIT_COLUMN_KERNEL", "1") != "0"


@cache
def load():
    """The kernel's library (lora_columns, lora_lanes), built on first use; None where it cannot be built here
    (logged once)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        library = ctypes.CDLL(str(_built()))  # after torch: its libgomp.so.1 serves the kernel's OpenMP
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("the per-column LoRA kernel could not be built (%s); mixed batches use side-by-side products",
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return None
    library.lora_columns.argtypes, library.lora_columns.restype = _COLUMNS_ARGS, ctypes.c_int
    library.lora_lanes.argtypes, library.lora_lanes.restype = _LANES_ARGS, ctypes.c_int
    return library


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
        self.slots_key = tuple(count.tolist())  # the ranks of each slot: what the columns' plans depend on

        self._lanes: tuple[torch.Tensor, torch.Tensor] | None = None

    def columns(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each column's first rank row and rank count, for the columns' slots (n,)."""
        slots = slots.clamp(max=len(self.slot_count) - 1)
        return self.slot_first[slots].contiguous(), self.slot_count[slots].contiguous()

    @property
    def groups(self) -> int:
        """Lane groups of 16 slots that cover this layer's slots 1 .. (slot 0 has no adapter)."""
        return -(-(len(self.slot_count) - 2) // LANES)

    def lanes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors by slot lanes, AL (groups, R, in, 16) and BL (groups, out, R, 16), R the largest rank,
        lane l of group g holding slot 16 g + l + 1 (zeros past a slot's own ranks); built on first use."""
        if self._lanes is None:
            slots, R = self.groups * LANES, self.max_rank
            A = self.A.new_zeros((slots, R, self.A.shape[1]))
            BT = self.BT.new_zeros((slots, R, self.BT.shape[1]))
            for slot in range(1, len(self.slot_count) - 1):
                first, count = int(self.slot_first[slot]), int(self.slot_count[slot])
                A[slot - 1, :count] = self.A[first : first + count]
                BT[slot - 1, :count] = self.BT[first : first + count]
            AL = A.view(self.groups, LANES, R, -1).permute(0, 2, 3, 1).contiguous()
            BL = BT.view(self.groups, LANES, R, -1).permute(0, 3, 2, 1).contiguous()
            self._lanes = AL, BL
        return self._lanes

    def lane_columns(self, slots: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Each column's lane (its slot - 1, or -1 where its slot has no ranks here) for the columns' slots (n,),
        with the factor floats the lane kernel reads for them and those the column kernel reads."""
        count = self.slot_count[slots.clamp(max=len(self.slot_count) - 1)]
        lane = torch.where(count > 0, slots - 1, -1).contiguous()
        groups = len(set((lane[lane >= 0] // LANES).tolist()))
        fan = self.A.shape[1] + self.BT.shape[1]
        distinct = slots[count > 0].unique()
        return lane, groups * LANES * self.max_rank * fan, int(self.slot_count[distinct].sum()) * fan


def add_columns(kernel, x: torch.Tensor, term: ColumnTerm, first: torch.Tensor, count: torch.Tensor,
                y: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """y (out, n) += each column's LoRA term for feature-major x (in, n), in place; fp32 CPU tensors, any
    strides. `work` holds at least n * (in + out) floats."""
    (fan_in, n), fan_out = x.shape, y.shape[0]
    failed = kernel.lora_columns(
        x.data_ptr(), fan_in, n, x.stride(0), x.stride(1),
        term.A.data_ptr(), term.BT.data_ptr(), term.A.shape[0], fan_out,
        first.data_ptr(), count.data_ptr(), term.max_rank,
        y.data_ptr(), y.stride(0), y.stride(1),
        work.data_ptr(), torch.get_num_threads(),
    )
    if failed:
        raise AssertionError("a column's ranks lie outside its layer's")
    return y


def add_lanes(kernel, x: torch.Tensor, term: ColumnTerm, lane: torch.Tensor, y: torch.Tensor,
              work: torch.Tensor) -> torch.Tensor:
    """y (out, n) += each column's LoRA term for feature-major x (in, n), in place, through the lane layout;
    fp32 CPU tensors, y's columns contiguous (stride 1), x's any. `work` holds at least 16 * in + groups * R * 16
    floats."""
    return lanes_call(kernel, term, lane, x.shape, y.shape, work)(x, y)


def lanes_call(kernel, term: ColumnTerm, lane: torch.Tensor, x_shape, y_shape, work: torch.Tensor):
    """add_lanes for x of x_shape (in, n) and y of y_shape (out, n) with all but x and y bound: f(x, y) -> y.
    A decode step calls it for every layer, so it does little more than the C call."""
    AL, BL = term.lanes()
    (fan_in, n), fan_out = x_shape, y_shape[0]
    scratch = LANES * (fan_in + AL.shape[0] * AL.shape[1])
    if len(lane) != n or AL.shape[2] != fan_in or BL.shape[1] != fan_out or work.numel() < scratch:
        raise ValueError("add_lanes: shapes or scratch do not match the layer's")
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    constant = (AL.data_ptr(), BL.data_ptr(), AL.shape[0], AL.shape[1], fan_out, lane.data_ptr())
    function, threads = kernel.lora_lanes, torch.get_num_threads()

    def call(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if (x.shape != x_shape or y.shape != y_shape or y.stride(1) != 1 or x.dtype != torch.float32
                or y.dtype != torch.float32 or not x.is_cpu or not y.is_cpu):
            raise ValueError("add_lanes needs fp32 CPU x and y of the planned shapes, y's columns contiguous")
        x_stride = x.stride()
        if function(x.data_ptr(), fan_in, n, *x_stride, *constant, y.data_ptr(), y.stride(0), work.data_ptr(), threads):
            raise AssertionError("a column's lane lies outside its layer's")
        return y

    call.memory = (AL, BL, lane, work)  # what the bound addresses point into, alive as long as the call
    return call
