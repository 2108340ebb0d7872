"""A mixed-adapter batch's LoRA terms for a feature-major decode step: (in, B) inputs, (out, B) outputs.

infer/decode_step.py keeps a decode step's hidden states as (features, rows). There the batch's
adapters of a layer sit side by side, as lora/mixed.py's stacked strategy puts them, but in their
stored orientation: A (W, in) holds the adapters' A one under the other (a sibling group's too:
q/k/v, gate/up), s B (out, W) their scaled B side by side, owner (W,) the adapter of each rank.
For a sibling group fed x (in, B) a step computes

    h = (A x) * mask                 (W, B); column b keeps the ranks of row b's adapter only
    out_i = W_i x + b_i + (s B)_i h_i  for each member i, h_i its ranks of h

two plain products per layer in the weight-major form a decode step's few rows multiply fastest in
(lora/base.py), with no per-row copies and no transposes; each adapter's factors are read once a
step however many rows use it, and zero mask entries contribute exact zeros. Those products do n
times the arithmetic a column needs when n adapters share the batch, so where lorakit's per-column
kernel is built (lora/column_kernel.py: fp32, the CPU) each column multiplies by its own adapter's
ranks only, from the same factors, or, for a decode step's columns over most of the kept adapters,
from the factors laid out by slot lanes (column_kernel.LaneGroup), one kernel call for a whole sibling
group: its first layer's call computes every member's base product and terms, and each member takes its
own output (_GroupStep, kept for the batch's next steps). A prompt pass's columns, each prompt's tokens a
run through one adapter, go by runs (column_kernel.add_segments: each run's factors read once).

The side-by-side factors are built for a set of adapters and kept while every row's adapter is
among them: rows joining or leaving (continuous batching) change only the mask. When a row brings
an adapter that is not among them they are built again, for the adapters in use and those kept
before, as long as that is at most twice the adapters in use (else for those in use only), so that
adapters coming and going under traffic do not rebuild them at every join. Each sibling group keeps
the last factors it was given on its first layer, for as long as the adapters they came from are
unchanged (lora/side_by_side.py), so that the next batch over the same adapters finds them built. Layers whose adapters
scale their rows' output (DoRA) are not covered here (`features_forward` returns None and the layer
runs as a module).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorakit.lora import column_kernel, group_kernel
from lorakit.lora.base import FROZEN_LINEARS, FrozenLinear, decode_layouts, frozen_features
from lorakit.lora.side_by_side import UNCOVERED, KeptFactors, SideBySide, side_by_side_entries

_SEGMENT_COLUMNS = 16  # above this many columns (a prompt pass), runs of one adapter go through the kernel at once
_SEGMENT_BLOCK = 3  # ... where the runs' blocks of 16 columns are at most a third of the columns (see _segments)
# With the per-column kernel, the factors are kept for every adapter a batch has used, up to this many (four lane
# groups): rows joining and leaving (continuous batching) then build nothing once each adapter has been seen.
KEEP_ADAPTERS = 64


def rows_forward(state, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """out + each row's LoRA term for a row-major input x (B, ..., in) whose base output is `out` (B, ..., out),
    through the per-column kernel, every token of row b with row b's adapter; None where the kernel does not
    apply (not built, autograd, not fp32 on the CPU, an output scale): use the other paths then."""
    if (
        state.strategy == "grouped" or layer.kind != "linear" or torch.is_grad_enabled()
        or x.dtype != torch.float32 or out.dtype != torch.float32 or not x.is_cpu
        or not column_kernel.enabled() or column_kernel.load() is None
    ):
        return None
    if state.features is None:
        state.features = FeatureTerms()
    return state.features.rows(state, layer, x, out)


def features_forward(state, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A LoRA layer's output in a mixed batch (lora/mixed.py's RowAdapters `state`) for a feature-major input
    x (in, B), as (out, B); None where this does not apply (the grouped strategy, embeddings, a base other than
    a plain Linear, DoRA's output scale): call the layer then."""
    features = state.features
    if features is not None and state.names is features._names:
        fast = features._steps.get(id(layer))
        if fast is not None:  # this layer's kernel step for the batch, kept at its first step
            return fast(x)
    if state.strategy == "grouped" or layer.kind != "linear" or type(layer.base_layer) not in FROZEN_LINEARS:
        return None
    if state.features is None:
        state.features = FeatureTerms()
    return state.features.forward(state, layer, x)


class _GroupStep:
    """A sibling group's decode step by slot lanes: every member's base product and, in one kernel call, their
    LoRA terms, computed at the group's first call for an x and handed to each member's call for the same x.
    `fused`, where given, computes both in one pass (lora/group_kernel.py), the same to the bit for the bases;
    the lane call is then made (`make_call()`) only if a step cannot take that pass."""

    def __init__(self, bases: list[nn.Module], make_call, fused=None):
        self.bases, self.fused = bases, fused
        self._make_call, self._call = make_call, None
        self._x: torch.Tensor | None = None  # held while a member's output waits: never another tensor's id
        self._outs: list[torch.Tensor | None] = [None] * len(bases)

    def __call__(self, index: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Member `index`'s output for x; `out`: its base product where the caller has it already."""
        if x is not self._x or self._outs[index] is None:
            if out is None and self.fused is not None and not torch.is_grad_enabled():
                outs = self.fused(x)
            else:
                if self._call is None:
                    self._call = self._make_call()
                outs = self._call(x, [out if k == index and out is not None else frozen_features(base, x)
                                      for k, base in enumerate(self.bases)])
            self._x, self._outs = x, outs
        result, self._outs[index] = self._outs[index], None
        if all(o is None for o in self._outs):
            self._x = None
        return result


class FeatureTerms:
    """The side-by-side factors of a RowAdapters state's batch, per layer, for feature-major steps."""

    def __init__(self):
        self.adapters: list[str] = []  # slot k + 1 holds adapters[k]; slot 0: no adapter
        self._layers: dict[int, tuple[SideBySide, int, int, torch.Tensor] | object | None] = {}
        self._names: list[str | None] | None = None  # the state's rows the slots were made for
        self._slots = torch.zeros(0, dtype=torch.long)
        # (a layer's ranks per slot, tokens a row) -> each column's first rank and rank count; ("segments", ranks per
        # slot) -> the runs' plan and its scratch (_segments)
        self._columns: dict[tuple, tuple | None] = {}
        self._work = torch.empty(0)  # the kernel's scratch, grown as needed
        self._groups: dict[int, _GroupStep | None] = {}  # id(a sibling group's SideBySide) -> its step by lanes
        self._steps: dict[int, object] = {}  # id(layer) -> (x, out=None) -> its output, from its group's step
        # LaneGroup.layout_key -> its lane_columns for the rows' slots: the 30 layers of a model plan 4 groups' worth
        self._lane_plans: dict[tuple, tuple[torch.Tensor, int, int]] = {}
        self._kernel = column_kernel.load() if column_kernel.enabled() else None
        self._padding: torch.Tensor | None = None  # the state's padding the columns were planned for

    def forward(self, state, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """W x + b + each row's LoRA term, (out, B), for feature-major x (in, B); None when the layer is
        not covered (an output scale)."""
        self._follow(state, layer)
        entry = self._layers[id(layer)] if id(layer) in self._layers else self._build(state, layer)
        if entry is UNCOVERED:
            return None
        base = layer.base_layer
        if entry is None:  # none of the batch's adapters is on this layer
            return frozen_features(base, x)
        side, start, stop, B, term = entry
        kernel = term is not None and self._kernel is not None and x.dtype == torch.float32 and x.is_cpu
        if kernel and self._group_step(state, layer, side, x) is not None:  # one pass: no base product first
            return self._steps[id(layer)](x)
        if kernel and x.shape[1] > _SEGMENT_COLUMNS and x.stride(1) != 1 and self._segments(term) is not None:
            x = x.contiguous()  # a prompt pass's runs read contiguous columns (o_proj's input is a transposed view)
        out = frozen_features(base, x)
        if kernel and out.dtype == torch.float32:
            if self._group_step(state, layer, side, x, out) is not None:  # by lanes, with its siblings: the next
                return self._steps[id(layer)](x, out)  # steps go straight to the kept step
            planned = self._segments(term) if x.shape[1] > _SEGMENT_COLUMNS else None
            if planned is not None and x.stride(1) == out.stride(1) == 1:  # a prompt pass: runs of one adapter
                plan, scratch = planned
                self._grow(scratch)
                return column_kernel.add_segments(self._kernel, x, term, B, plan, out, self._work)
            return self._by_column(x, term, out, 1)
        h = side.of(x, self._slots)[start:stop]
        if B.dtype != out.dtype:  # adapters kept in another type than the step's: their term in theirs
            return out.add_(torch.mm(B, h).to(out.dtype))
        return out.addmm_(B, h)

    def rows(self, state, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """out + each row's LoRA term for row-major x (B, ..., in) and its base output (B, ..., out); None
        when the kernel does not cover the layer."""
        self._follow(state, layer)
        entry = self._layers[id(layer)] if id(layer) in self._layers else self._build(state, layer)
        if entry is None:  # none of the batch's adapters is on this layer
            return out
        if entry is UNCOVERED or entry[4] is None or self._kernel is None:
            return None
        rows, fan_in = len(state.names), x.shape[-1]
        tokens = x.numel() // (fan_in * rows) if rows else 0
        if tokens * rows * fan_in != x.numel() or x.shape[0] != rows:
            return None
        if state.padding is not self._padding:  # a new prompt pass: plan its columns again
            self._padding = state.padding
            self._columns.clear()
        padding = self._padding if self._padding is not None and self._padding.shape == (rows, tokens) else None
        y = out if out.is_contiguous() else out.contiguous()
        columns = x.reshape(rows * tokens, fan_in).t()  # (in, columns): a view, or a copy of a strided x
        self._by_column(columns, entry[4], y.view(rows * tokens, -1).t(), tokens, padding)
        return y

    def _segments(self, term) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """The batch's columns as runs of one adapter (column_kernel.segments_of) and the scratch add_segments needs
        for them, where add_segments computes them in fewer steps than the per-column kernel (a prompt pass's tokens),
        else None (a decode step's rows, each a run of its own). add_segments costs about _SEGMENT_BLOCK columns of
        the per-column kernel per block of up to 16 columns of a run (576 -> 1536, 16 rank-8 adapters: 7.3 against
        2.6 us). Planned once per set of ranks per slot: every layer of a model shares a few."""
        key = ("segments", term.slots_key)
        if key not in self._columns:
            plan = column_kernel.segments_of(term, self._slots)
            blocks = int(((plan[1] + 15) // 16).sum())
            few = 0 < _SEGMENT_BLOCK * blocks <= int(plan[1].sum())
            self._columns[key] = (plan, column_kernel.segments_scratch(plan)) if few else None
        return self._columns[key]

    def _by_column(self, x: torch.Tensor, term, out: torch.Tensor, tokens: int,
                   padding: torch.Tensor | None = None) -> torch.Tensor:
        """out (out, n) += each column's own LoRA term for x (in, n), through the per-column kernel; each row's
        slot covers `tokens` consecutive columns; tokens where `padding` (rows, tokens) is true are skipped."""
        # the same for every layer with the same adapters' ranks (one padding per prompt pass: see rows)
        key = (term.slots_key, tokens, padding is not None)
        columns = self._columns.get(key)
        if columns is None:
            columns = self._columns[key] = self._columns_of(term, tokens, padding)
        self._grow(x.shape[1] * (x.shape[0] + out.shape[0]))
        return column_kernel.add_columns(self._kernel, x, term, *columns, out, self._work)

    def _grow(self, size: int) -> None:
        """A scratch of at least `size` floats for the kernel; a new one (calls kept for the batch keep theirs)."""
        if self._work.numel() < size:
            self._work = torch.empty(size)

    def _columns_of(self, term, tokens: int, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(first rank, rank count) per column, each row's slot covering `tokens` consecutive columns; no ranks
        where `padding` (rows, tokens) is true."""
        first, count = term.columns(self._slots)
        if tokens > 1:
            first, count = first.repeat_interleave(tokens), count.repeat_interleave(tokens)
        if padding is not None:
            count = count.masked_fill(padding.reshape(-1).to(count.device), 0)
        return first, count

    def _group_step(self, state, layer: nn.Module, side: SideBySide, x: torch.Tensor, out: torch.Tensor | None = None):
        """The batch's step by slot lanes for the layer's sibling group (kept in self._steps for each member), or
        None where the lanes would read over twice the factors the column kernel reads (few of the kept adapters
        in use) or do not apply. Without `out` (the layer's base product, not computed yet) only a step in one pass
        (`_fused`) is made; else None, and the group is planned again when called with it."""
        if id(side) in self._groups:
            return self._groups[id(side)]
        group = state.siblings.get(id(layer), [layer])
        members = [m for m in group if isinstance(self._layers.get(id(m)), tuple) and self._layers[id(m)][4]]
        if layer not in members or len(members) > column_kernel.MEMBERS or (out is not None and out.stride(1) != 1):
            self._groups[id(side)] = None
            return None
        if side.lanes is None:
            side.lanes = column_kernel.LaneGroup([self._layers[id(m)][4] for m in members])
        lanes = side.lanes
        plan = self._lane_plans.get(lanes.layout_key)
        if plan is None:
            plan = self._lane_plans[lanes.layout_key] = lanes.lane_columns(self._slots)
        lane, lane_floats, column_floats = plan
        if lane_floats > 2 * column_floats:
            self._groups[id(side)] = None
            return None
        bases = [m.base_layer for m in members]
        fused = self._fused(side, lanes, bases, x.shape[0], len(lane))
        if fused is None and out is None:
            return None
        n = x.shape[1]
        self._grow(column_kernel.LANES * (x.shape[0] + lanes.groups * lanes.ranks))
        make_call = functools.partial(column_kernel.lanes_call, column_kernel.load(lanes.AL.dtype), lanes, lane,
                                      x.shape, [(o, n) for o in lanes.outs], self._work)
        step = self._groups[id(side)] = _GroupStep(bases, make_call, fused and functools.partial(fused, lane=lane))
        for index, member in enumerate(members):
            self._steps[id(member)] = functools.partial(step, index)
        return step

    def _fused(self, side: SideBySide, lanes, bases: list[nn.Module], fan_in: int, n: int):
        """The group's step in one pass (lora/group_kernel.py: f(x, lane)) where n columns multiply their fp32 bases
        by lorakit's product kernel (`decode_layouts`), or None. Prepared once per group and kept with its factors,
        for as long as the bases keep their weights: rows joining and leaving and the next batches over the same
        adapters only change the lanes."""
        if not 1 <= n <= group_kernel.COLUMNS or decode_layouts()[n] != "kernel":
            return None
        weights = tuple((base.weight, getattr(base, "bias", None)) for base in bases)
        key = tuple((w.data_ptr(), w.dtype, w.shape, w.stride(), b is None or b.data_ptr()) for w, b in weights)
        kept = side.group_pass
        if kept is None or kept[0] != key:
            function, call = group_kernel.load(lanes.AL.dtype), None
            if function is not None and lanes.groups <= group_kernel.GROUPS and all(
                    type(base) in (nn.Linear, FrozenLinear) and base.weight.dtype == torch.float32
                    and base.weight.is_cpu and base.weight.is_contiguous() for base in bases):
                work = torch.empty(column_kernel.LANES * (fan_in + lanes.groups * lanes.ranks))
                call = group_kernel.group_call(function, lanes, bases, fan_in, work)
            kept = side.group_pass = (key, call)
        return kept[1]

    def _follow(self, state, layer: nn.Module) -> None:
        """When the state's rows changed (its adapters change only with them): new slots, and the factors
        built again if a row's adapter is not among them. A new batch first takes the adapters the layers'
        kept factors were built for when they include its own (where the per-column kernel runs, the kept
        adapters that no row uses cost nothing), so that batches over subsets of the same adapters (4 of 16,
        then 16) build nothing; a row's new adapter joins the kept ones (with the kernel, up to KEEP_ADAPTERS
        of them; else while they are at most twice those in use), so that rows joining and leaving a running
        batch build the factors again only for an adapter not seen before."""
        if state.names is self._names:
            return
        used = set(state.distinct)
        if not self.adapters:
            kept = getattr(state.siblings.get(id(layer), [layer])[0], "side_by_side", None)
            few = kept is not None and (self._kernel or len(kept.adapters) <= 2 * len(used))
            if few and used <= set(kept.adapters):
                self.adapters = list(kept.adapters)
        if not used <= set(self.adapters):  # keep the adapters still in use or kept recently, when few
            kept = used | set(self.adapters)
            few = len(kept) <= (KEEP_ADAPTERS if self._kernel is not None else 2 * len(used))
            self.adapters = sorted(kept if few else used)
            self._layers.clear()
        slot = {name: k + 1 for k, name in enumerate(self.adapters)}
        self._slots = torch.tensor([slot.get(name, 0) for name in state.names], dtype=torch.long)
        self._columns.clear()
        self._lane_plans.clear()
        self._groups.clear()
        self._steps.clear()
        self._names = state.names

    def _build(self, state, layer: nn.Module):
        """The side-by-side factors of the layer's sibling group (or the layer alone); returns the layer's entry.

        They are kept on the group's first layer, with what they were built from (each adapter, its scaling and
        its parameters by storage and version), and taken from there while those are unchanged: a new batch over the
        same adapters (the next request, the next `generate_mixed`) builds nothing."""
        group = state.siblings.get(id(layer), [layer])
        present = []
        for member in group:
            adapters = member.adapters._modules  # the ModuleDict's own dict: read 16 times a layer
            present.append([(k + 1, adapters[n]) for k, n in enumerate(self.adapters) if n in adapters])
        kept = getattr(group[0], "side_by_side", None)
        if kept is None or not kept.holds(present):
            found = [[(k, adapter.row_factors(m)) for k, adapter in f] for m, f in zip(group, present)]
            entries = side_by_side_entries(group, found)
            kept = group[0].side_by_side = KeptFactors(present, entries, tuple(self.adapters))
        for member in group:
            self._layers[id(member)] = kept.entries.get(id(member))
        return self._layers[id(layer)]
