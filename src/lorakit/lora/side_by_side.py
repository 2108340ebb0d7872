"""A sibling group's side-by-side factors for a mixed batch's feature-major steps, and how they are kept.

lora/mixed_features.py multiplies a mixed batch's LoRA terms from one layout per sibling group (q/k/v,
gate/up, or a layer alone): A (W, in), the batch's adapters' A one under the other, s B (out, W) their
scaled B side by side, owner (W,) the slot of each rank (`side_by_side_entries`). A group keeps the last
factors it was given on its first layer (`KeptFactors`), with what they were built from, so that the next
batch over the same adapters finds them built for as long as those adapters are unchanged.
"""

from __future__ import annotations

import weakref
from itertools import chain
from operator import attrgetter

import torch
from torch import nn

from lorakit.lora import column_kernel

UNCOVERED = object()  # the entry of a layer these factors do not serve (an output scale: DoRA)
_PARAMETERS, _SCALING, _VERSION = attrgetter("_parameters"), attrgetter("scaling"), attrgetter("_version")


class SideBySide:
    """A (W, in) and owner (W,) of a layer or sibling group, with the last input's masked product."""

    def __init__(self, A: torch.Tensor, owner: torch.Tensor):
        self.A, self.owner = A, owner
        self.lanes = None  # its factors by slot lanes (column_kernel.LaneGroup), laid out at a decode step's first use
        self.group_pass: tuple | None = None  # (its bases' weights, the group's step in one pass or None): _fused
        self._x: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def of(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(A x) * mask for feature-major x (in, B) and each row's slot (B,); computed once per input."""
        if x is not self._x or slots is not self._slots:
            if slots is not self._slots:
                self._mask = (self.owner[:, None] == slots[None, :]).to(self.A.dtype)  # (W, B)
            self._h = torch.mm(self.A, x if x.dtype == self.A.dtype else x.to(self.A.dtype)).mul_(self._mask)
            self._x, self._slots = x, slots
        return self._h


class KeptFactors:
    """A sibling group's side-by-side factors (`entries`: id(member) -> its entry), the adapters they were built for,
    and what they were built from (`source`: each adapter's slot, the adapter and its parameters by id, its scaling,
    its parameters' storage and version, trained in place). The adapters and parameters are watched by weak
    reference: once one is freed the factors never hold again, whatever object later takes its id (an adapter
    unloaded and another loaded under its name)."""

    def __init__(self, present: list[list[tuple[int, nn.Module]]], entries: dict, adapters: tuple[str, ...]):
        self.entries, self.adapters = entries, adapters
        self.source, watched = factors_source(present)
        self.freed = False
        self._refs = [weakref.ref(o, self._freed) for o in watched]

    def _freed(self, _ref) -> None:
        self.freed = True

    def holds(self, present: list[list[tuple[int, nn.Module]]]) -> bool:
        """Whether these factors are those of the adapters `present` ((slot, adapter) per member), unchanged."""
        return not self.freed and self.source == factors_source(present)[0]


def factors_source(present: list[list[tuple[int, nn.Module]]]) -> tuple[tuple, list]:
    """What factors built for `present` ((slot, adapter) per member) are built from, and the adapters and parameters
    to watch. Read for every sibling group of every new batch: each piece in one C-level pass over all the adapters."""
    adapters = [adapter for found in present for _, adapter in found]
    params = [p for p in chain.from_iterable(map(dict.values, map(_PARAMETERS, adapters))) if p is not None]
    source = (tuple(k for found in present for k, _ in found), tuple(map(id, adapters)), tuple(map(_SCALING, adapters)),
              tuple(map(id, params)), tuple(map(torch.Tensor.data_ptr, params)), tuple(map(_VERSION, params)))
    return source, adapters + params


def side_by_side_entries(group: list[nn.Module], found: list[list[tuple]]) -> dict[int, object]:
    """id(member) -> its entry (side, start, stop, s B, its kernel's ColumnTerm or None), UNCOVERED or None,
    for a sibling group whose members have the adapters `found` ((slot, row factors) per member)."""
    present = [(m, f) for m, f in zip(group, found) if f]
    if any(scale is not None for _, f in present for _, (_, _, _, scale) in f):
        return {id(m): UNCOVERED for m in group}
    entries: dict[int, object] = {id(m): None for m in group}
    if not present:
        return entries
    A = torch.cat([A for _, f in present for _, (A, _, _, _) in f])  # (W, in)
    owner = torch.cat([torch.full((A.shape[0],), k, dtype=torch.long) for _, f in present for k, (A, *_) in f])
    side = SideBySide(A, owner.to(A.device))
    start = 0
    for member, f in present:
        first = f[0][1][1]
        B = first.new_empty((first.shape[0], sum(B.shape[1] for _, (_, B, _, _) in f)))  # (out, width): s B
        column, scaling = 0, []
        for _, (_, part, s, _) in f:
            torch.mul(part, s, out=B[:, column : column + part.shape[1]])
            column += part.shape[1]
            scaling.append(torch.full((part.shape[1],), s, dtype=torch.float32))
        stop = start + B.shape[1]
        term = None
        if B.dtype == A.dtype == torch.float32 and B.is_cpu and column_kernel.enabled() and column_kernel.load():
            term = column_kernel.ColumnTerm(A[start:stop], B.t(), side.owner[start:stop], torch.cat(scaling))
        entries[id(member)] = (side, start, stop, B, term)
        start = stop
    return entries
