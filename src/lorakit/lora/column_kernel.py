"""Each column's own LoRA term in a feature-major batch, through a small C kernel (column_kernel.c).

A mixed-adapter decode step multiplies the batch's adapters side by side and masks each column to
its own adapter (lora/mixed_features.py): two plain products, but n times the arithmetic a column
needs when n adapters share the batch. On the CPU, where a decode step is bound by that arithmetic,
16 rows over 16 adapters spent a fifth of the step there. The kernel computes, per column b,

    y[:, b] += (s B)_b A_b x[:, b]

reading only its adapter's ranks, on the process's OpenMP threads (torch's own libgomp). For a decode
step's contiguous columns over up to a few groups of 16 adapters, `add_lanes` computes the same terms,
for every layer of a sibling group at once, from the factors laid out by slot lanes (`LaneGroup`),
reading them front to back as full vectors, with no gather of the inputs and no transpose of the
outputs. For a prompt pass's many columns, runs of consecutive columns through one adapter (a prompt's
tokens), `add_segments` multiplies each run by its adapter's factors along the rows of the
feature-major inputs and outputs, reading the factors once a run.

The lane layouts hold fp32 factors; int8 ones where every rank of the group is int8 values times a power of
two (an adapter rounded by `lorakit serve --lora-dtype int8`, lora/int8_factors.py), each rank's scales folded
into its sum, a quarter of the bytes; else bf16 ones where every factor is a bf16 value (an adapter trained or
saved in bf16, or rounded to it: `--lora-dtype bf16`), half the bytes. The same values either way, read by the
kernel's build for that type.

It is compiled once per machine with the system's C compiler (lorakit/native.py) and loaded with
ctypes. `load()` returns the library, or None where it cannot be built (no compiler, another platform);
`enabled()` is false where LORAKIT_COLUMN_KERNEL=0. Callers keep the side-by-side products then.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from functools import cache
from pathlib import Path

import torch

from lorakit import native
from lorakit.lora.int8_factors import int8_rows

SOURCE = Path(__file__).with_suffix(".c")
_COLUMNS_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # A, BT, W, out
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # first, count, max_rank
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # y, its strides
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]
_LANES_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # AL, SL, groups, R, lane
    ctypes.c_int64, ctypes.c_void_p,  # members, their table (rank0, ranks, out, y's feature stride)
    *[ctypes.c_void_p] * 4, *[ctypes.c_void_p] * 4,  # each member's BL, its y
    ctypes.c_void_p, ctypes.c_int,  # work, threads
]
_SEGMENTS_ARGS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, in, n, its feature stride
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # A, s B, W, out
    ctypes.c_int64, *[ctypes.c_void_p] * 4,  # segments: their start, length, first rank, rank count
    ctypes.c_void_p, ctypes.c_int64,  # y, its feature stride
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # work, its floats, threads
]
MEMBERS = 4  # the members of a sibling group one lane call serves at most (column_kernel.c's MEMBERS)
LANES = 16  # slots a lane group holds: one 16-float vector
LANE_TYPES = (torch.float32, torch.bfloat16, torch.int8)  # the lane layouts' factor types (where they hold them)
# FMA contraction on, as the product kernels build (lora/weight_kernel.py): a term's multiply-adds in one instruction
# each, rounded once; a prompt pass's runs (lora_segments) about a tenth faster than with a multiply and an add
FLAGS = [*native.FLAGS, "-ffp-contract=fast"]
_LANE_FLAGS = {torch.float32: [], torch.bfloat16: ["-DLANE_BF16"], torch.int8: ["-DLANE_INT8"]}


def enabled() -> bool:
    """Whether the kernel may be used (LORAKIT_COLUMN_KERNEL=0 turns it off); read on every call."""
    return os.environ.get("LORAKIT_COLUMN_KERNEL", "1") != "0"


@cache
def load(lanes: torch.dtype = torch.float32):
    """The kernel's library (lora_columns, lora_lanes), built on first use, its lane layouts' factors of type
    `lanes` (fp32, bf16 or int8: `library.lane_dtype`); None where it cannot be built here (logged once)."""
    library = native.load_library(SOURCE, FLAGS + lane_flags(lanes),
                                  what="the per-column LoRA kernel (mixed batches use side-by-side products)")
    if library is None:
        return None
    library.lora_columns.argtypes, library.lora_columns.restype = _COLUMNS_ARGS, ctypes.c_int
    library.lora_lanes.argtypes, library.lora_lanes.restype = _LANES_ARGS, ctypes.c_int
    library.lora_segments.argtypes, library.lora_segments.restype = _SEGMENTS_ARGS, ctypes.c_int
    library.lane_dtype = lanes
    return library


def lane_flags(lanes: torch.dtype) -> list[str]:
    """The C flags that build a lane kernel for factors of type `lanes` (column_kernel.c, group_kernel.c)."""
    if lanes not in LANE_TYPES:
        raise ValueError(f"lane factors are fp32, bf16 or int8, not {lanes}")
    return _LANE_FLAGS[lanes]


class ColumnTerm:
    """One LoRA layer's factors for the kernel: A (W, in) rows and (s B)^T (W, out) rows, the adapters'
    ranks one under the other, and where each slot's ranks lie (slot 0: no adapter)."""

    def __init__(self, A: torch.Tensor, BT: torch.Tensor, owner: torch.Tensor, scaling: torch.Tensor | None = None):
        """A (W, in), BT (W, out) and owner (W,), the slot of each rank row, in ascending order; `scaling` (W,) the
        s each rank row of BT was multiplied by (1 where not given): where int8 lanes look for their scales."""
        if len(owner) and bool((owner[1:] < owner[:-1]).any()):
            raise ValueError("ColumnTerm needs each slot's ranks together, slots in ascending order")
        self.A, self.BT = A.contiguous(), BT.contiguous()
        self.scaling = torch.ones(len(owner)) if scaling is None else scaling.float().cpu()
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

    def lane_factors(self, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors by slot lanes over `groups` (at least this layer's), AL (groups, R, in, 16) and BL
        (groups, out, R, 16), R the largest rank, lane l of group g holding slot 16 g + l + 1 (zeros past a slot's
        own ranks and for slots without ranks here), and each lane rank's scaling (groups, R, 16), 1 where zeros."""
        slots, R = groups * LANES, self.max_rank
        A = self.A.new_zeros((slots, R, self.A.shape[1]))
        BT = self.BT.new_zeros((slots, R, self.BT.shape[1]))
        scaling = torch.ones((slots, R))
        for slot in range(1, len(self.slot_count) - 1):
            first, count = int(self.slot_first[slot]), int(self.slot_count[slot])
            A[slot - 1, :count] = self.A[first : first + count]
            BT[slot - 1, :count] = self.BT[first : first + count]
            scaling[slot - 1, :count] = self.scaling[first : first + count]
        AL = A.view(groups, LANES, R, -1).permute(0, 2, 3, 1).contiguous()
        BL = BT.view(groups, LANES, R, -1).permute(0, 3, 2, 1).contiguous()
        return AL, BL, scaling.view(groups, LANES, R).transpose(1, 2).contiguous()


class LaneGroup:
    """The lane layouts of a sibling group's layers fed the same x (q/k/v, gate/up; or one layer): AL of every
    member's ranks one after the other, (groups, sum of R, in, 16), and each member's BL, so that one kernel call
    adds every member's terms; in int8 where every rank is int8 values times a power of two (with SL, each lane
    rank's two scales, (groups, sum of R, 16)), else in bf16 where every factor is a bf16 value, else fp32."""

    def __init__(self, terms: list[ColumnTerm]):
        if not 1 <= len(terms) <= MEMBERS or len({t.A.shape[1] for t in terms}) != 1:
            raise ValueError(f"a lane group holds 1 to {MEMBERS} layers of the same input size")
        self.terms = terms
        self.groups = max(t.groups for t in terms)
        factors = [t.lane_factors(self.groups) for t in terms]
        self.AL = torch.cat([AL for AL, _, _ in factors], dim=1)
        self.BL = [BL for _, BL, _ in factors]
        self.SL: torch.Tensor | None = None
        narrow = None
        if load(torch.int8) is not None:
            narrow = _int8_lanes(self.AL, self.BL, [scaling for *_, scaling in factors])
        if narrow is not None:  # a quarter of the bytes
            self.AL, self.BL, self.SL = narrow
        elif load(torch.bfloat16) is not None and all(_bf16_values(t) for t in [self.AL, *self.BL]):  # half the bytes
            self.AL, self.BL = self.AL.to(torch.bfloat16), [BL.to(torch.bfloat16) for BL in self.BL]
        ranks = [t.max_rank for t in terms]
        rank0 = [sum(ranks[:m]) for m in range(len(terms))]
        self.outs = [t.BT.shape[1] for t in terms]
        # each member's first rank in AL, its ranks, its outputs (lanes_call adds y's feature stride)
        self.table = list(zip(rank0, ranks, self.outs))
        self._columns: dict[tuple[int, ...], tuple[torch.Tensor, int, int]] = {}  # lane_columns by the slots
        # what lane_columns depends on besides the slots: groups with the same key plan the same for any slots
        self.layout_key = tuple((t.slots_key, t.A.shape[1], t.BT.shape[1], t.max_rank) for t in terms)

    @property
    def ranks(self) -> int:
        """All members' ranks, AL's second axis."""
        return self.AL.shape[1]

    def lane_columns(self, slots: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Each column's lane (its slot - 1, or -1 where no member has ranks for its slot) for the columns' slots
        (n,), with the factor floats the lane kernel reads for them and those the column kernel would. Kept for
        the last few slot lists (the next batch over the same rows finds them); the lanes are not to be written."""
        key = tuple(slots.tolist())
        found = self._columns.get(key)
        if found is None:
            if len(self._columns) >= 8:
                self._columns.pop(next(iter(self._columns)))
            found = self._columns[key] = self._lane_columns(slots)
        return found

    def _lane_columns(self, slots: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # The lanes read every slot's factors of the groups in use once per block of 16 columns; the column kernel
        # a column's own adapter's once per column, or per four consecutive columns of one adapter (a prompt's).
        lane_floats = column_floats = 0
        present = torch.zeros(len(slots), dtype=torch.bool)
        columns = Counter(slots.tolist())  # columns per slot
        for term in self.terms:
            count = term.slot_count[slots.clamp(max=len(term.slot_count) - 1)]
            present |= count > 0
            fan = term.A.shape[1] + term.BT.shape[1]
            ranks = term.slot_count.tolist()
            column_floats += sum(ranks[min(s, len(ranks) - 1)] * -(-c // 4) for s, c in columns.items()) * fan
            lane_floats += term.max_rank * fan
        lane = torch.where(present, slots - 1, -1).contiguous()
        groups = len(set((lane[lane >= 0] // LANES).tolist()))
        return lane, -(-len(slots) // LANES) * groups * LANES * lane_floats, column_floats


def _int8_lanes(AL: torch.Tensor, BLs: list[torch.Tensor], scalings: list[torch.Tensor]):
    """(AL, BLs, SL) in int8 lanes with each lane rank's scales, where every rank of A (over the inputs) and of each
    BL (over the outputs, after its scaling) is int8 values times a power of two; else None."""
    groups, R, fan_in, _ = AL.shape
    found = int8_rows(AL.permute(0, 1, 3, 2).reshape(-1, fan_in), torch.ones(groups * R * LANES))
    if found is None:
        return None
    qA = found[0].view(groups, R, LANES, fan_in).permute(0, 1, 3, 2).contiguous()
    scales, qBs = [found[1].view(groups, R, LANES)], []
    for BL, scaling in zip(BLs, scalings):
        out, ranks = BL.shape[1], BL.shape[2]
        if not ranks:  # a member without ranks here: nothing to read
            qBs.append(BL.to(torch.int8))
            scales.append(scaling)
            continue
        found = int8_rows(BL.permute(0, 2, 3, 1).reshape(-1, out), scaling.reshape(-1))
        if found is None:
            return None
        qBs.append(found[0].view(groups, ranks, LANES, out).permute(0, 3, 1, 2).contiguous())
        scales.append(found[1].view(groups, ranks, LANES))
    return qA, qBs, (scales[0] * torch.cat(scales[1:], dim=1)).contiguous()


def _bf16_values(t: torch.Tensor) -> bool:
    """Whether every value of fp32 `t` is a bf16 value (bf16 keeps fp32's exponents, 8 of its 24 bits)."""
    return bool((t.view(torch.int32) & 0xFFFF).eq(0).all())


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


def segments_of(term: ColumnTerm, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(start, length, first rank, rank count) of each run of consecutive columns with the same slot that has ranks
    in `term`, for the columns' slots (n,): add_segments' plan."""
    n = len(slots)
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = slots[1:] != slots[:-1]
    start = torch.nonzero(change).flatten()
    length = torch.diff(start, append=torch.tensor([n]))
    first, count = term.columns(slots[start])
    keep = count > 0
    return tuple(t[keep].contiguous() for t in (start, length, first, count))


def add_segments(kernel, x: torch.Tensor, term: ColumnTerm, B: torch.Tensor, plan: tuple[torch.Tensor, ...],
                 y: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """y (out, n) += each column's LoRA term for feature-major x (in, n), in place, for columns in runs through the
    same adapter (`plan`: segments_of), from term's A and B = (s B) (out, W) contiguous (term.BT transposed);
    fp32 CPU tensors whose columns are contiguous (stride 1). `work` holds at least sum(16 * ceil(length / 16) *
    count) floats (`segments_scratch`; the kernel checks it)."""
    start, length, first, count = plan
    (fan_in, n), fan_out = x.shape, y.shape[0]
    if x.stride(1) != 1 or y.stride(1) != 1 or B.shape != term.BT.t().shape or not B.is_contiguous():
        raise ValueError("add_segments needs x and y with contiguous columns and B (out, W)")
    failed = kernel.lora_segments(
        x.data_ptr(), fan_in, n, x.stride(0), term.A.data_ptr(), B.data_ptr(), term.A.shape[0], fan_out,
        len(start), start.data_ptr(), length.data_ptr(), first.data_ptr(), count.data_ptr(),
        y.data_ptr(), y.stride(0), work.data_ptr(), work.numel(), torch.get_num_threads(),
    )
    if failed == 2:
        raise ValueError("add_segments needs a larger scratch (segments_scratch)")
    if failed:
        raise AssertionError("a segment lies outside the columns or its ranks outside its layer's")
    return y


def segments_scratch(plan: tuple[torch.Tensor, ...]) -> int:
    """The floats add_segments' work holds for `plan`: each segment's ranks for its blocks of 16 columns."""
    _, length, _, count = plan  # a few segments: Python's ints are faster than torch's ops on them
    return sum(16 * ((n + 15) // 16) * c for n, c in zip(length.tolist(), count.tolist()))


def add_lanes(kernel, x: torch.Tensor, group: LaneGroup, lane: torch.Tensor, ys: list[torch.Tensor],
              work: torch.Tensor) -> list[torch.Tensor]:
    """Each member's y_m (out_m, n) += each column's LoRA term for feature-major x (in, n), in place, through the
    lane layout; fp32 CPU tensors, the y_m's columns contiguous (stride 1), x's any. `work` holds at least
    16 * in + groups * R * 16 floats."""
    return lanes_call(kernel, group, lane, x.shape, [y.shape for y in ys], work)(x, ys)


def lanes_call(kernel, group: LaneGroup, lane: torch.Tensor, x_shape, y_shapes, work: torch.Tensor):
    """add_lanes for x of x_shape (in, n) and the members' y of y_shapes (out_m, n) with all but x and the y bound:
    f(x, ys) -> ys. A decode step calls it for every sibling group, so it does little more than the C call."""
    (fan_in, n), members = x_shape, len(group.terms)
    x_shape, y_shapes = tuple(x_shape), [tuple(shape) for shape in y_shapes]
    scratch = LANES * (fan_in + group.groups * group.ranks)
    if kernel.lane_dtype != group.AL.dtype:
        raise ValueError(f"add_lanes: {group.AL.dtype} lanes need the kernel built for them (load({group.AL.dtype}))")
    if (len(lane) != n or group.AL.shape[2] != fan_in or len(y_shapes) != members or work.numel() < scratch
            or any(shape != (out, n) for shape, out in zip(y_shapes, group.outs))):
        raise ValueError("add_lanes: shapes or scratch do not match the layers'")
    # each member's row: rank0, ranks, out, y's feature stride (n: y contiguous, columns of stride 1)
    table = torch.tensor([[*row, n] for row in group.table], dtype=torch.int64)
    pointers = [BL.data_ptr() for BL in group.BL] + [0] * (MEMBERS - members)
    scales = 0 if group.SL is None else group.SL.data_ptr()
    head = (group.AL.data_ptr(), scales, group.groups, group.ranks, lane.data_ptr(), members, table.data_ptr(),
            *pointers)
    function, threads, missing = kernel.lora_lanes, torch.get_num_threads(), [0] * (MEMBERS - members)

    def call(x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        if (x.shape != x_shape or x.dtype != torch.float32 or not x.is_cpu or len(ys) != members
                or any(y.shape != shape or y.dtype != torch.float32 or not y.is_cpu or not y.is_contiguous()
                       for y, shape in zip(ys, y_shapes))):
            raise ValueError("add_lanes needs fp32 CPU x and contiguous y of the planned shapes")
        if function(x.data_ptr(), fan_in, n, *x.stride(), *head, *[y.data_ptr() for y in ys], *missing,
                    work.data_ptr(), threads):
            raise AssertionError("a column's lane lies outside its layers'")
        return ys

    call.memory = (group, lane, table, work)  # what the bound addresses point into, alive as long as the call
    return call
