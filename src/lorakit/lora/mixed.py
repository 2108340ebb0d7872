"""Mixed-adapter batches: row i of a batch goes through adapter a_i (or none) in one forward pass.

For a LoRA layer with base weight W and the adapters a_1..a_n used in the batch,

    h_i = W x_i + s_{a_i} B_{a_i} A_{a_i} x_i

Two ways to compute the LoRA term, chosen per batch (`strategy`):

    gathered  once per batch and layer, stack the batch's adapters with ranks padded by zeros and
              the scale folded into B, slot 0 all zeros ("no adapter"), and gather one copy per
              row: A^T (B, in, r_max), s B^T (B, r_max, out); every forward is then two bmm's.
              Rows that leave the batch are dropped from the copies.
    grouped   for each adapter, run its rows (index_select) through it and add the result back.

Zero padding changes nothing: the padded rows of A and columns of B contribute exact zeros. The
gathered path is the one for linear and GPT-2 Conv1D layers; embedding layers always use the
grouped path. Sibling layers fed the same input (q/k/v, gate/up: `SHARED_INPUT`) share one
down-projection: their per-row A^T are concatenated, x A^T runs once for all of them, and each
takes its slice; a sibling that is handed a different tensor computes its own.
`row_adapters(model, names)` turns all this on for every LoraLayer and off again after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.adapters import adapter_config, lora_layers, saved_modules

STRATEGIES = ("gathered", "grouped")
_UNSET = object()
# Children of one module that transformers' attention and MLP blocks call on the same tensor.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class _Down:
    """x A^T for one layer or a group of siblings fed the same x: A_rows (B, in, sum of r), and the
    last input seen with its product, so each sibling after the first only slices it."""

    def __init__(self, A_rows: torch.Tensor):
        self.A_rows = A_rows
        self.width = A_rows.shape[-1]
        self._x: torch.Tensor | None = None
        self._version = -1
        self._h: torch.Tensor | None = None

    def of(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (B, ..., in) -> x A^T restricted to columns start:stop, shape (B, T, stop - start)."""
        if x is not self._x or x._version != self._version:
            rows = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
            if rows.dtype != self.A_rows.dtype:
                rows = rows.to(self.A_rows.dtype)
            self._h = torch.bmm(rows, self.A_rows)
            self._x, self._version = x, x._version
        return self._h if stop - start == self.width else self._h[..., start:stop]

    def select(self, index: torch.Tensor) -> None:
        self.A_rows = self.A_rows[index.to(self.A_rows.device)]
        self._x = self._h = None


class RowAdapters:
    """Which adapter each row of the batch uses; shared by every LoraLayer while it is set.

    `names` holds one adapter name (or None) per row. `select(keep)` drops rows from the batch
    (finished requests), so the generation loop can shrink the batch between steps.
    """

    def __init__(
        self, names: list[str | None], strategy: str = "gathered", siblings: dict[int, list[nn.Module]] | None = None
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.distinct = sorted({n for n in names if n is not None})  # slot k+1 holds distinct[k]
        self.siblings = siblings or {}  # id(layer) -> the layers sharing its input (itself included)
        self._rows: dict[int, tuple[_Down, int, int, torch.Tensor] | None] = {}  # id(layer) -> down, cols, s B^T
        self.names: list[str | None] = []
        self.index = torch.zeros(0, dtype=torch.long)
        self._set_rows(list(names))

    def _set_rows(self, names: list[str | None]) -> None:
        self.names = names
        slot = {n: k + 1 for k, n in enumerate(self.distinct)}
        self.index = torch.tensor([slot.get(n, 0) for n in names], dtype=torch.long)  # (B,)
        self.groups = [
            (name, torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long))
            for name in self.distinct
            if name in names
        ]

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at positions `keep` (in that order)."""
        self._set_rows([self.names[i] for i in keep])
        index = torch.tensor(keep)
        for down in {id(rows[0]): rows[0] for rows in self._rows.values() if rows is not None}.values():
            down.select(index)
        for key, rows in self._rows.items():
            if rows is not None:
                down, start, stop, B_rows = rows
                self._rows[key] = (down, start, stop, B_rows[index.to(B_rows.device)])

    # -- the LoRA term --------------------------------------------------------------------------
    def forward(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A LoraLayer's forward while this state is set: base output plus each row's LoRA term."""
        base = layer.base_layer
        # A plain Linear called directly: decoding runs this once per layer and step, and the module
        # call's own overhead is a sizeable part of a batch-of-16 decode step.
        out = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x, *args, **kwargs)
        if self.strategy == "gathered" and layer.kind != "embedding" and len(self.groups) > 1:
            rows = self._rows_of(layer)
            return out if rows is None else self._add_gathered(out, x, *rows)
        term = self._grouped(layer, x)
        return out if term is None else out + term.to(out.dtype)

    def _grouped(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        out = None
        for name, rows in self.groups:
            if name not in layer.adapters:
                continue
            if len(rows) == len(self.names):  # every row uses it: no gather, no scatter
                return layer._adapter_output(layer.adapters[name], x)
            part = layer._adapter_output(layer.adapters[name], x.index_select(0, rows.to(x.device)))
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out.index_add_(0, rows.to(x.device), part)
        return out

    @staticmethod
    def _add_gathered(out: torch.Tensor, x: torch.Tensor, down: _Down, start: int, stop: int, B_rows: torch.Tensor):
        """out + (x A^T) s B^T row by row: x (B, ..., in), this layer's columns of the down-projection
        (B, T, r), B_rows (B, r, out).

        Without autograd the add rides on the second matmul, in place (baddbmm_): one op and one
        temporary fewer per layer and decode step.
        """
        h = down.of(x, start, stop)  # (B, T, r)
        if torch.is_grad_enabled() or out.dtype != B_rows.dtype or not out.is_contiguous():
            return out + torch.bmm(h, B_rows).reshape(out.shape).to(out.dtype)
        if out.dim() == 3:
            return out.baddbmm_(h, B_rows)
        return out.view(out.shape[0], -1, out.shape[-1]).baddbmm_(h, B_rows).view(out.shape)

    def _rows_of(self, layer: nn.Module) -> tuple[_Down, int, int, torch.Tensor] | None:
        """This layer's down-projection (its own, or shared with its siblings), its columns in it,
        and each row's s B^T; gathered once per batch (kept until rows change). None when no adapter
        of the batch is on this layer."""
        key = id(layer)
        rows = self._rows.get(key, _UNSET)
        if rows is not _UNSET:
            return rows
        group = self.siblings.get(key, [layer])
        stacks = [self._stacked(member) for member in group]
        present = [(member, A, B) for member, (A, B) in zip(group, stacks) if A is not None]
        for member, (A, _) in zip(group, stacks):
            if A is None:
                self._rows[id(member)] = None
        if present:
            index = self.index.to(present[0][1].device)
            down = _Down(torch.cat([A[index] for _, A, _ in present], dim=-1))  # (B, in, sum r)
            start = 0
            for member, A, B in present:
                self._rows[id(member)] = (down, start, start + A.shape[-1], B[index])
                start += A.shape[-1]
        return self._rows[key]

    def _stacked(self, layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's adapters on this layer stacked by slot, ranks zero-padded, the scale folded
        into B: A^T (n + 1, in, r_max), s B^T (n + 1, r_max, out), slot 0 zeros; (None, None) if none."""
        present = [layer.adapters[n] if n in layer.adapters else None for n in self.distinct]  # noqa: SIM401 (ModuleDict has no get)
        if all(a is None for a in present):
            return None, None
        ref = next(a for a in present if a is not None).A
        r_max = max(a.r for a in present if a is not None)
        if all(a is not None and a.r == r_max for a in present):  # the common case: a few ops, not 2 per adapter
            A = torch.stack([ref.new_zeros((layer.in_features, r_max)), *(a.A.detach().T for a in present)])
            B = torch.stack([ref.new_zeros((r_max, layer.out_features)), *(a.B.detach().T for a in present)])
            scales = torch.tensor([0.0, *(a.scaling for a in present)], dtype=B.dtype)
            return A, B.mul_(scales.to(B.device)[:, None, None])
        A = ref.new_zeros((len(present) + 1, layer.in_features, r_max))  # slot 0: no adapter
        B = ref.new_zeros((len(present) + 1, r_max, layer.out_features))
        for slot, adapter in enumerate(present, start=1):
            if adapter is not None:
                A[slot, :, : adapter.r] = adapter.A.detach().T
                B[slot, : adapter.r] = adapter.B.detach().T * adapter.scaling
        return A, B


def sibling_layers(named_layers: list[tuple[str, nn.Module]]) -> dict[int, list[nn.Module]]:
    """id(layer) -> the LoraLayers of its `SHARED_INPUT` group under the same parent (linear or Conv1D
    layers with the same in_features), for layers that have siblings."""
    groups: dict[tuple[str, int], list[nn.Module]] = {}
    for name, layer in named_layers:
        parent, _, leaf = name.rpartition(".")
        for k, members in enumerate(SHARED_INPUT):
            if leaf in members and layer.kind != "embedding":
                groups.setdefault((parent, k), []).append(layer)
    out = {}
    for members in groups.values():
        if len(members) > 1 and len({m.in_features for m in members}) == 1:
            out.update({id(m): members for m in members})
    return out


@contextmanager
def row_adapters(model: nn.Module, names: list[str | None], strategy: str = "gathered"):
    """Inside the block, row i of every batch the model sees uses adapter `names[i]` (None: the base).

    Yields the `RowAdapters` state; call `.select(keep)` on it when rows leave the batch.

    Raises:
        KeyError: a name is not an adapter of the model.
        ValueError: an adapter is merged, or one of the named adapters carries modules_to_save
            (a per-adapter head cannot differ per row).
    """
    for name in {n for n in names if n is not None}:
        adapter_config(model, name)
        if any(name in w.copies for _, w in saved_modules(model)):
            raise ValueError(f"adapter '{name}' has modules_to_save; mixed batches support LoRA layers only")
    named = lora_layers(model)
    layers = [layer for _, layer in named]
    if any(layer.merged for layer in layers):
        raise ValueError("a mixed-adapter batch needs unmerged adapters; call unmerge_adapters(model) first")
    state = RowAdapters(names, strategy, sibling_layers(named))
    for layer in layers:
        layer.row_adapters = state
    try:
        yield state
    finally:
        for layer in layers:
            layer.row_adapters = None
