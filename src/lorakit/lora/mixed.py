"""Mixed-adapter batches: row i of a batch goes through adapter a_i (or none) in one forward pass.

For a LoRA layer with base weight W and the adapters a_1..a_n used in the batch,

    h_i = W x_i + s_{a_i} B_{a_i} A_{a_i} x_i

Three ways to compute the LoRA term, chosen per batch (`strategy`):

    stacked   once per batch and layer, put the batch's n adapters side by side, the scale folded
              into B: A^T (in, sum of r), s B^T (sum of r, out), and note which adapter owns each
              of the sum-of-r columns. Every forward is then two plain matmuls over all rows,
              (x A^T * mask) s B^T, where the 0/1 mask keeps each row's own adapter's columns.
              Each adapter's weights are read once per step however many rows use it; the
              matmuls do n times the arithmetic a row needs, which is small while n is.
    gathered  once per batch and layer, copy each row's adapter (ranks padded with zeros, zeros
              for a row without one): A^T (B, in, r_max), s B^T (B, r_max, out); every forward is
              two bmm's: arithmetic per row, but each row's copy is read.
    grouped   for each adapter, run its rows (index_select) through it and add the result back.

Where lorakit's per-column kernel is built (lora/column_kernel.py) and the batch runs in fp32 on the
CPU without autograd, stacked and gathered batches both hand the LoRA term to it instead: each row
(each of its tokens) multiplied by its own adapter's ranks only, from the side-by-side factors that
lora/mixed_features.py keeps per layer, with no per-row copies. What follows is the path without it.

`auto` (the default) takes stacked when the rows share adapters (at most half as many adapters as
rows), gathered otherwise: decoding through the model's forward, 16 rows over 4 adapters took 84
against 87 ms a step stacked, 16 rows over 16 adapters 93 against 84. Zero padding and zero mask
entries contribute exact zeros. Embedding layers always use the grouped path. Each adapter gives its
per-row factors itself (`row_factors`: A, B, s and an output scale); a DoRA adapter's magnitude over
its weight norm is folded into its B and scales its rows' base output, so DoRA runs per row too.
Sibling layers fed the same input (q/k/v, gate/up: `SHARED_INPUT`) share one down-projection: their
A^T are concatenated, x A^T runs once for all of them, and each takes its columns; a sibling handed
a different tensor computes its own. Rows that leave the batch (`select`) are dropped from the masks
or the per-row copies; rows that join a gathered batch (`extend`, continuous batching) bring their
own copies, appended below. `row_adapters(model, names)` turns all this on for every LoraLayer and
off again after. Feature-major decode steps (infer/decode_step.py) use lora/mixed_features.py for
stacked and gathered batches alike, whose strategy then decides only how prompts are prefilled.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.adapters import adapter_config, lora_layers, saved_modules
from lorakit.lora.base import PLAIN_LINEARS, decode_linear
from lorakit.lora.mixed_downs import RowDown, StackedDown
from lorakit.lora.mixed_features import rows_forward

STRATEGIES = ("auto", "stacked", "gathered", "grouped")
_UNSET = object()
# Children of one module that transformers' attention and MLP blocks call on the same tensor.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class RowAdapters:
    """Which adapter each row of the batch uses; shared by every LoraLayer while it is set.

    `names` holds one adapter name (or None) per row. `select(keep)` drops rows from the batch
    (finished requests), so the generation loop can shrink the batch between steps.
    """

    def __init__(
        self, names: list[str | None], strategy: str = "auto", siblings: dict[int, list[nn.Module]] | None = None
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.distinct = sorted({n for n in names if n is not None})  # slot k+1 holds distinct[k]
        if strategy == "auto":  # stacked reads each adapter once, gathered one copy per row: see above
            strategy = "stacked" if 2 * len(self.distinct) <= len(names) else "gathered"
        self.strategy = strategy
        self.siblings = siblings or {}  # id(layer) -> the layers sharing its input (itself included)
        # id(layer) -> down, its columns, s B^T, per-row output scale (None: all ones)
        self._rows: dict[int, tuple[RowDown, int, int, torch.Tensor, torch.Tensor | None] | None] = {}
        self._layers: dict[int, nn.Module] = {}  # id(layer) -> layer, for the layers built
        self.features = None  # a mixed_features.FeatureTerms, made by its first feature-major step
        # (B, T), true at the left padding of the prompt pass about to run: no token attends to those and their
        # outputs are never read, so the per-column kernel skips their LoRA terms (None: no padding to skip)
        self.padding: torch.Tensor | None = None
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
                down, start, stop, B, scale = rows
                scale = None if scale is None else scale[index.to(scale.device)]
                self._rows[key] = (down, start, stop, down.keep(B, index), scale)

    def extend(self, other: RowAdapters) -> bool:
        """Append `other`'s rows below these, reusing both states' per-row factors (continuous batching:
        rows joining after their own prefill), instead of building every row's copies again. A layer's
        ranks are zero-padded to the wider of the two states'. Both must be gathered and built for the
        same layers, with the same kind of output scale; otherwise nothing changes and this returns
        False (build a new state for all the rows then). A state that built no per-row copies (none of
        its forwards ran yet, or the per-column kernel served them all) just takes the rows on."""
        if self.strategy != "gathered" or other.strategy != "gathered":
            return False
        if not self._rows:  # nothing built: copies, if any path needs them, are built for all the rows
            names = self.names + other.names
            self.distinct = sorted({n for n in names if n is not None})
            self._set_rows(names)
            return True
        for key in self._rows.keys() - other._rows.keys():  # a batch of one adapter never built its rows
            other._rows_of(self._layers[key])
        if self._rows.keys() != other._rows.keys():
            return False
        groups: dict[int, list[int]] = {}  # id(down) -> the layers sharing it
        for key, mine in self._rows.items():
            theirs = other._rows[key]
            if mine is None or theirs is None:
                if mine is not theirs:
                    return False
            elif (mine[4] is None) != (theirs[4] is None):
                return False
            else:
                groups.setdefault(id(mine[0]), []).append(key)
        if any(len({id(other._rows[key][0]) for key in keys}) != 1 for keys in groups.values()):
            return False
        for keys in groups.values():
            keys.sort(key=lambda key: self._rows[key][1])  # in column order (the same in both states)
            widths = [max(state._rows[key][2] - state._rows[key][1] for state in (self, other)) for key in keys]
            # A_rows is kept as the transpose of (B, W, in) rows (see _per_row): joined in that layout
            down = RowDown(torch.cat([_padded_A(state, keys, widths) for state in (self, other)]).mT)
            start = 0
            for key, width in zip(keys, widths):
                (_, _, _, B, scale), (_, _, _, B_other, scale_other) = self._rows[key], other._rows[key]
                B = torch.cat([_pad_rank(B, width), _pad_rank(B_other, width)])
                scale = None if scale is None else torch.cat([scale, scale_other])
                self._rows[key] = (down, start, start + width, B, scale)
                start += width
        names = self.names + other.names
        self.distinct = sorted({n for n in names if n is not None})
        self._set_rows(names)
        return True

    # -- the LoRA term --------------------------------------------------------------------------
    def forward(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A LoraLayer's forward while this state is set: base output plus each row's LoRA term."""
        base = layer.base_layer
        # A plain Linear called directly: decoding runs this once per layer and step, and the module
        # call's own overhead is a sizeable part of a batch-of-16 decode step.
        out = decode_linear(x, base.weight, base.bias) if type(base) in PLAIN_LINEARS else base(x, *args, **kwargs)
        if self.strategy != "grouped" and layer.kind != "embedding" and len(self.groups) > 1:
            by_row = rows_forward(self, layer, x, out)  # the per-column kernel, where it applies
            if by_row is not None:
                return by_row
            rows = self._rows_of(layer)
            if rows is None:
                return out
            down, start, stop, B, scale = rows
            if scale is not None:
                out = _scale_rows(out, base.bias, scale)
            return down.add(out, x, start, stop, B)
        return self._grouped(layer, x, out)

    def _grouped(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for name, rows in self.groups:
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
            if len(rows) == len(self.names):  # every row uses it: no gather, no scatter
                return adapter.output(layer, x, out)
            index = rows.to(x.device)
            part = adapter.output(layer, x.index_select(0, index), out.index_select(0, index))
            out = out.index_copy(0, index, part)
        return out

    def _rows_of(self, layer: nn.Module) -> tuple[RowDown, int, int, torch.Tensor, torch.Tensor | None] | None:
        """This layer's down-projection (its own, or shared with its siblings), its columns in it,
        s B^T (stacked, or one per row) and the per-row output scale (None when every row's is 1);
        built once per batch (kept until rows change). None when no adapter of the batch is on this layer."""
        key = id(layer)
        rows = self._rows.get(key, _UNSET)
        if rows is not _UNSET:
            return rows
        group = self.siblings.get(key, [layer])
        present = [m for m in group if any(n in m.adapters for n in self.distinct)]
        for member in group:
            self._rows[id(member)] = None
            self._layers[id(member)] = member
        if present:
            build = self._side_by_side if self.strategy == "stacked" else self._per_row
            down, parts = build(present)
            start = 0
            for member, (width, B, scale) in zip(present, parts):
                self._rows[id(member)] = (down, start, start + width, B, scale)
                start += width
        return self._rows[key]

    def _side_by_side(self, members: list[nn.Module]) -> tuple[RowDown, list[tuple]]:
        """The batch's adapters side by side, the scale folded into B: A^T (in, W) over all members,
        and per member (its width, s B^T (width, out), per-row output scale or None); owner says
        which slot each column serves."""
        A_parts, owners, parts = [], [], []
        for member in members:
            present = [
                (slot, member.adapters[n].row_factors(member)) for slot, n in enumerate(self.distinct, 1)
                if n in member.adapters
            ]
            A_parts += [A.T for _, (A, _, _, _) in present]
            owners += [torch.full((A.shape[0],), slot, dtype=torch.long) for slot, (A, _, _, _) in present]
            B = torch.cat([B.T * s for _, (_, B, s, _) in present])
            scales = [(slot, scale) for slot, (_, _, _, scale) in present if scale is not None]
            scale = None
            if scales:  # one row per slot (slot 0, no adapter: ones), picked per batch row
                table = B.new_ones((len(self.distinct) + 1, B.shape[1]))
                for slot, value in scales:
                    table[slot] = value
                scale = table[self.index.to(table.device)]  # (B, out)
            parts.append((B.shape[0], B, scale))
        A = torch.cat(A_parts, dim=1)
        return StackedDown(A, torch.cat(owners).to(A.device), self.index), parts

    def _per_row(self, members: list[nn.Module]) -> tuple[RowDown, list[tuple]]:
        """One copy per row: A^T (B, in, W) with each member's columns (its ranks padded with zeros
        to the largest of the batch's adapters there), and per member (its width, s B^T (B, width,
        out), per-row output scale or None); zeros where a row has no adapter. A is copied as stored,
        (r, in) pieces one after the other in one cat, and used transposed: a copy per piece into a
        transposed slot costs several times more, and bmm reads either layout as fast in decoding."""
        # name -> (A, B, s, output scale) per member, asked once: module attribute access is slow
        found = [{n: m.adapters[n].row_factors(m) for n in self.distinct if n in m.adapters} for m in members]
        widths = [max(A.shape[0] for A, _, _, _ in f.values()) for f in found]
        ref = next(iter(found[0].values()))[0]  # every member here has at least one of the adapters
        sizes = [(m.in_features, m.out_features) for m in members]
        zeros = ref.new_zeros((max(widths), max(i for i, _ in sizes)))
        pieces = []
        for name in self.names:
            for f, width, (fan_in, _) in zip(found, widths, sizes):
                A = f[name][0] if name in f else None
                r = 0 if A is None else A.shape[0]
                pieces += [A] if r else []
                pieces += [zeros[: width - r, :fan_in]] if r < width else []
        A_rows = torch.cat(pieces).view(len(self.names), sum(widths), -1).mT  # (B, in, W)
        parts = []
        for f, width, (_, fan_out) in zip(found, widths, sizes):
            zero_B = ref.new_zeros((fan_out, width))
            blocks, scales = [], []
            for name in self.names:
                _, B, scale, _ = f.get(name, (None, zero_B, 0.0, None))
                blocks.append(B if B.shape[1] == width else F.pad(B, (0, width - B.shape[1])))
                scales.append(scale)
            stacked = torch.stack(blocks)  # (B, out, width)
            B = stacked.new_empty((len(self.names), width, fan_out))
            torch.mul(stacked.mT, torch.tensor(scales, dtype=B.dtype, device=B.device)[:, None, None], out=B)
            out_scale = None
            if any(f[n][3] is not None for n in f):
                ones = ref.new_ones(fan_out)
                out_scale = torch.stack([f[n][3] if n in f and f[n][3] is not None else ones for n in self.names])
            parts.append((width, B, out_scale))
        return RowDown(A_rows), parts


def _padded_A(state: RowAdapters, keys: list[int], widths: list[int]) -> torch.Tensor:
    """The (B, W, in) rows of the down-projection shared by layers `keys`, each layer's columns zero-padded
    to its width in `widths`."""
    A = state._rows[keys[0]][0].A_rows.mT
    pieces = [_pad_rank(A[:, state._rows[key][1] : state._rows[key][2]], width) for key, width in zip(keys, widths)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _pad_rank(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, r, n) -> (B, width, n), zero rows below: zero ranks contribute exact zeros."""
    return x if x.shape[1] == width else F.pad(x, (0, 0, 0, width - x.shape[1]))


def _scale_rows(out: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """Each row's base output, bias aside, times its output scale: (out - b) * scale + b; scale (B, out)."""
    scale = scale.view(scale.shape[0], *([1] * (out.dim() - 2)), scale.shape[-1]).to(out.dtype)
    return out * scale if bias is None else (out - bias) * scale + bias


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
def row_adapters(model: nn.Module, names: list[str | None], strategy: str = "auto"):
    """Inside the block, row i of every batch the model sees uses adapter `names[i]` (None: the base).

    Yields the `RowAdapters` state; call `.select(keep)` on it when rows leave the batch.

    Raises:
        KeyError: a name is not an adapter of the model.
        ValueError: an adapter is merged, or one of the named adapters carries modules_to_save
            (a per-adapter head cannot differ per row).
    """
    wrappers = saved_modules(model)  # walked once: a model with many adapters has many modules
    for name in {n for n in names if n is not None}:
        adapter_config(model, name)
        if any(name in w.copies for _, w in wrappers):
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
