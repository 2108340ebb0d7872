"""A sibling group's decode step, base products and slot-lane LoRA terms in one call (group_kernel.c).

In a mixed-adapter decode step the base products of a sibling group (q/k/v, gate/up) stream its weights
and its adapters' LoRA terms stream every adapter's factors, doing little with them. `group_call` binds a
group's weights, biases and lane layout (column_kernel.LaneGroup) for a batch's columns, and the call
computes every member's W x + b + its columns' terms in one parallel region: the columns' ranks from the A
factors first (fp32, bf16 or int8 lanes: load's `lanes`), then the products, each output's term added before it
is stored. Each member's W x + b is the same to the bit as
lora/weight_kernel.py's product plus its bias, so it serves where `lora.base.decode_layouts` multiplies the
step's columns by that kernel.

It is compiled once per machine (lorakit/native.py) with the product kernel's flags; `load()` returns
None where it cannot be built, and LORAKIT_WEIGHT_KERNEL=0 leaves it out with the product kernel.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from lorakit import native
from lorakit.lora import weight_kernel
from lorakit.lora.column_kernel import LANES, MEMBERS, LaneGroup, lane_flags

SOURCE = Path(__file__).with_suffix(".c")
COLUMNS = 16  # the most columns one call takes: one block of the product kernel
GROUPS = 4  # the most lane groups (of 16 slots) one call takes (group_kernel.c's GROUPS)
_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # x, in, n, members, table
    *[ctypes.c_void_p] * 8,  # each member's weight, its bias
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # AL, SL, groups, R, lane
    *[ctypes.c_void_p] * 8,  # each member's BL, its y
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]


@cache
def load(lanes: torch.dtype = torch.float32):
    """The kernel's C function for lane layouts of type `lanes` (fp32, bf16, int8: `function.lane_dtype`), built on
    first use; None where it cannot be built here (logged once)."""
    if not weight_kernel.enabled():
        return None
    flags = weight_kernel.FLAGS + lane_flags(lanes)
    library = native.load_library(SOURCE, flags, what="the group decode-step kernel")
    if library is None:
        return None
    function = library.group_step
    function.argtypes, function.restype = _ARGS, ctypes.c_int
    function.lane_dtype = lanes
    return function


def group_call(function, group: LaneGroup, bases: list, fan_in: int, work: torch.Tensor):
    """f(x, lane) -> [y_m]: each member's W_m x + b_m + its columns' LoRA terms, (out_m, n), for fp32 CPU x (in, n)
    of the n = len(lane) columns, lane[b] column b's lane (int64); `bases` the members' frozen fp32 linears, `work`
    at least 16 * in + groups * R * 16 floats (kept by the call). Prepared once for the group and its bases: a batch
    whose rows change (continuous batching) passes each step's lanes."""
    members = len(group.terms)
    weights = [base.weight.detach() for base in bases]
    biases = [None if base.bias is None else base.bias.detach() for base in bases]
    if (group.groups > GROUPS or len(bases) != members
            or function.lane_dtype != group.AL.dtype or group.AL.shape[2] != fan_in
            or work.numel() < LANES * (fan_in + group.groups * group.ranks)
            or any(w.shape != (out, fan_in) or w.dtype != torch.float32 or not w.is_contiguous() or not w.is_cpu
                   for w, out in zip(weights, group.outs))
            or any(b is not None and (b.dtype != torch.float32 or not b.is_contiguous()) for b in biases)):
        raise ValueError("group_call: shapes, types or scratch do not match the layers'")
    table = torch.tensor([[rank0, ranks, out] for rank0, ranks, out in group.table], dtype=torch.int64)
    missing = [0] * (MEMBERS - members)
    middle = (
        members, table.data_ptr(),
        *[w.data_ptr() for w in weights], *missing, *[0 if b is None else b.data_ptr() for b in biases], *missing,
        group.AL.data_ptr(), 0 if group.SL is None else group.SL.data_ptr(), group.groups, group.ranks,
    )
    tail = (*[BL.data_ptr() for BL in group.BL], *missing)
    outs = group.outs

    def call(x: torch.Tensor, lane: torch.Tensor) -> list[torch.Tensor]:
        n = len(lane)
        if (not 1 <= n <= COLUMNS or lane.dtype != torch.int64 or not lane.is_contiguous()
                or x.shape != (fan_in, n) or x.dtype != torch.float32 or not x.is_cpu):
            raise ValueError(f"group_call: x must be fp32 CPU ({fan_in}, n) and lane n int64s, 1 <= n <= {COLUMNS}; "
                             f"got x {tuple(x.shape)} {x.dtype}, lane {tuple(lane.shape)} {lane.dtype}")
        x = x.contiguous()
        ys = [torch.empty(out, n) for out in outs]
        if function(x.data_ptr(), fan_in, n, *middle, lane.data_ptr(), *tail, *[y.data_ptr() for y in ys], *missing,
                    work.data_ptr(), torch.get_num_threads()):
            raise AssertionError("a column's lane lies outside its layers'")
        return ys

    call.memory = (group, table, weights, biases, work)  # what the bound addresses point into
    return call
