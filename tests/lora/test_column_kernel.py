"""The per-column LoRA kernel: each column's term equals its own adapter's products, in every layout."""

from __future__ import annotations

import logging

import pytest
import torch

import lorakit
from conftest import TINY_MODELS, logits_of, on_threads, perturb
from lorakit.lora import column_kernel, group_kernel, mixed_features, weight_kernel
from lorakit.lora.mixed import row_adapters

pytestmark = pytest.mark.skipif(column_kernel.load() is None, reason="no C compiler here to build the kernel")


def factors(ranks: list[int], fan_in: int, fan_out: int, seed: int = 0):
    """A (W, in), s B (out, W) and owner (W,) for adapters of the given ranks in slots 1.."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(sum(ranks), fan_in, generator=generator)
    B = torch.randn(fan_out, sum(ranks), generator=generator)
    owner = torch.cat([torch.full((r,), k + 1) for k, r in enumerate(ranks)])
    return A, B, owner


def term_of(A, B, owner):
    return column_kernel.ColumnTerm(A, B.t(), owner)


def expected(x: torch.Tensor, y: torch.Tensor, A, B, owner, slots) -> torch.Tensor:
    """y + each column's term, column by column in float64."""
    out = y.double().clone()
    for b, slot in enumerate(slots.tolist()):
        rows = owner == slot
        out[:, b] += B[:, rows].double() @ (A[rows].double() @ x[:, b].double())
    return out.float()


def assert_own_terms(result, y, want, slots):
    """The kernel returned y holding `want`; the columns without ranks here (slots 0, 4 and 9) are left alone."""
    assert result is y
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    untouched = (slots == 0) | (slots == 4) | (slots == 9)
    assert torch.equal(y[:, untouched], want[:, untouched])


@pytest.mark.parametrize("layout", ["feature-major", "y-transposed", "row-major", "x-strided"])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_column_gets_its_own_adapters_term(layout, threads):
    # odd sizes: the vector loops' tails; slot 4 has no ranks
    ranks, fan_in, fan_out = [4, 8, 2, 0, 5], 37, 150
    A, B, owner = factors([r for r in ranks if r], fan_in, fan_out)
    owner = torch.cat([torch.full((r,), k + 1) for k, r in enumerate(ranks)])
    term = term_of(A, B, owner)
    slots = torch.tensor([2, 0, 1, 5, 4, 3, 2, 9, 1])  # 0: no adapter, 4: none here, 9: beyond this layer's
    n = len(slots)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(fan_in, n, generator=generator)
    y = torch.randn(fan_out, n, generator=generator)
    want = expected(x, y, A, B, owner, slots)
    if layout == "y-transposed":  # (out, n) as a view of a row-major (n, out) buffer
        y = y.t().contiguous().t()
    elif layout == "row-major":  # x and y as views of (n, in) and (n, out) rows: a prompt's tokens
        x, y = x.t().contiguous().t(), y.t().contiguous().t()
    elif layout == "x-strided":
        x = torch.randn(fan_in, 2 * n)[:, ::2].copy_(x)
    first, count = term.columns(slots)
    work = torch.full((n * (fan_in + fan_out),), float("nan"))  # scratch: never read before written
    kernel = column_kernel.load()
    result = on_threads(threads, lambda: column_kernel.add_columns(kernel, x, term, first, count, y, work))
    assert_own_terms(result, y, want, slots)


@pytest.mark.parametrize("first, count", [([0, 0], [2, 4]), ([0, 4], [2, 2]), ([-1, 0], [2, 0])],
                         ids=["above-the-largest-rank", "past-the-rows", "before-the-rows"])
def test_ranks_outside_the_layers_write_nothing(first, count):
    A, B, owner = factors([2, 3], 8, 6)
    term = term_of(A, B, owner)
    x, y = torch.randn(8, 2), torch.randn(6, 2)
    before = y.clone()
    with pytest.raises(AssertionError, match="outside"):
        column_kernel.add_columns(column_kernel.load(), x, term, torch.tensor(first), torch.tensor(count), y,
                                  torch.empty(2 * 14))
    assert torch.equal(y, before)
    with pytest.raises(ValueError, match="ascending"):
        term_of(A, B, owner.flip(0))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("strided", [False, True], ids=["packed", "rows-wider-than-the-columns"])
def test_runs_of_one_adapter_get_their_adapters_term(threads, strided):
    """add_segments: a prompt pass's columns, runs of one slot (blocks of 16 and tails, a run at the rows' end)."""
    ranks, fan_in, fan_out = [4, 8, 2, 0, 11], 37, 150
    A, B, owner = factors([r for r in ranks if r], fan_in, fan_out)
    owner = torch.cat([torch.full((r,), k + 1) for k, r in enumerate(ranks)])
    term = term_of(A, B, owner)
    runs = [(2, 5), (0, 3), (1, 16), (5, 21), (4, 2), (9, 4), (3, 33), (2, 1), (5, 7)]  # (slot, columns)
    slots = torch.cat([torch.full((length,), slot) for slot, length in runs])
    n = len(slots)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(fan_in, n, generator=generator), torch.randn(fan_out, n, generator=generator)
    want = expected(x, y, A, B, owner, slots)
    if strided:  # (in, n) and (out, n) as the first columns of wider rows
        x = torch.randn(fan_in, n + 5).narrow(1, 0, n).copy_(x)
        wide = torch.randn(fan_out, n + 3)
        y, outside = wide.narrow(1, 0, n).copy_(y), wide[:, n:].clone()
    plan = column_kernel.segments_of(term, slots)
    assert [int(c) for c in plan[1]] == [length for slot, length in runs if slot in (1, 2, 3, 5)]
    work = torch.full((column_kernel.segments_scratch(plan),), float("nan"))
    result = on_threads(threads, lambda: column_kernel.add_segments(column_kernel.load(), x, term, B.contiguous(),
                                                                      plan, y, work))
    assert_own_terms(result, y, want, slots)
    if strided:
        assert torch.equal(wide[:, n:], outside)  # nothing past the columns is written


@pytest.mark.parametrize("run, by_runs", [(1, False), (2, False), (4, True), (24, True)])
def test_a_batch_goes_by_runs_where_its_runs_are_long(run, by_runs):
    """A prompt pass's tokens (long runs of one adapter) go through add_segments, a decode step's rows (a run each)
    through the per-column kernel, which takes fewer steps for them."""
    A, B, owner = factors([8] * 4, 16, 24)
    terms = mixed_features.FeatureTerms()
    terms._slots = (torch.arange(64) // run) % 4 + 1
    planned = terms._segments(term_of(A, B, owner))
    assert (planned is not None) == by_runs
    if by_runs:
        plan, scratch = planned
        assert plan[1].tolist() == [run] * (64 // run) + ([64 % run] if 64 % run else [])
        assert scratch == column_kernel.segments_scratch(plan)


def test_a_scratch_too_small_for_the_segments_writes_nothing():
    A, B, owner = factors([2, 3], 8, 6)
    term = term_of(A, B, owner)
    x, y = torch.randn(8, 20), torch.randn(6, 20)
    before = y.clone()
    plan = column_kernel.segments_of(term, torch.tensor([1] * 12 + [2] * 8))  # 2 * 16 + 3 * 16 floats
    assert column_kernel.segments_scratch(plan) == 80
    with pytest.raises(ValueError, match="larger scratch"):
        column_kernel.add_segments(column_kernel.load(), x, term, B.contiguous(), plan, y, torch.empty(79))
    assert torch.equal(y, before)
    column_kernel.add_segments(column_kernel.load(), x, term, B.contiguous(), plan, y, torch.empty(80))
    assert not torch.equal(y, before)


def test_a_segment_outside_the_columns_writes_nothing():
    A, B, owner = factors([2, 3], 8, 6)
    term = term_of(A, B, owner)
    x, y = torch.randn(8, 4), torch.randn(6, 4)
    before = y.clone()
    for plan in [(torch.tensor([2]), torch.tensor([3]), torch.tensor([0]), torch.tensor([2])),  # past column 4
                 (torch.tensor([0]), torch.tensor([4]), torch.tensor([2]), torch.tensor([4]))]:  # past rank row 5
        with pytest.raises(AssertionError, match="outside"):
            column_kernel.add_segments(column_kernel.load(), x, term, B.contiguous(), plan, y, torch.empty(64))
        assert torch.equal(y, before)


def test_built_once_into_the_cache_and_rebuilt_for_another_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    column_kernel.load.cache_clear()
    try:
        assert column_kernel.load() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
        stamp = built[0].stat().st_mtime_ns
        column_kernel.load.cache_clear()
        assert column_kernel.load() is not None and built[0].stat().st_mtime_ns == stamp  # taken from the cache
    finally:
        column_kernel.load.cache_clear()


def test_without_a_compiler_mixed_batches_keep_the_products(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    column_kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lorakit.native"):
            assert column_kernel.load() is None
        assert "could not be built" in caplog.text
        model, ids, names = mixed_model()
        with row_adapters(model, names) as state:
            mixed = logits_of(model, ids)
        assert state.features is None  # the products served the batch
        assert_rows_equal_alone(model, ids, names, mixed)
    finally:  # every kernel first asked for without a compiler is asked for again by later tests
        for load in (column_kernel.load, group_kernel.load, weight_kernel._library):
            load.cache_clear()


def mixed_model():
    model = TINY_MODELS["llama"]()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, (name, r) in enumerate({"a": 4, "b": 8, "c": 2}.items()):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), name)
        perturb(model, name, std=0.2, seed=seed)
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    return model, ids, ["c", "a", None, "b"]


def assert_rows_equal_alone(model, ids, names, mixed):
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = logits_of(model, ids[row : row + 1])
        else:
            lorakit.set_adapter(model, name)
            alone = logits_of(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["stacked", "gathered"])
def test_a_mixed_forward_goes_through_the_kernel(strategy, monkeypatch):
    model, ids, names = mixed_model()
    calls = []
    add = column_kernel.add_columns
    monkeypatch.setattr(column_kernel, "add_columns", lambda *args: calls.append(1) or add(*args))
    with row_adapters(model, names, strategy) as state:
        mixed = logits_of(model, ids)
    assert state.features is not None and len(calls) == 7 * len(model.model.layers)
    assert not state._rows  # no per-row copies were built
    assert_rows_equal_alone(model, ids, names, mixed)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_layout_gives_the_same_bits(threads):
    # a prompt's tokens (row-major) and a decode step (feature-major) must not round a column differently;
    # columns 0-3 and 4-7 go as blocks of four through the same ranks, the rest one by one
    A, B, owner = factors([3, 8, 5], 45, 70, seed=2)
    term = term_of(A, B, owner)
    slots = torch.tensor([3, 3, 3, 3, 1, 1, 1, 1, 1, 2, 0, 0, 2, 2])
    n = len(slots)
    first, count = term.columns(slots)
    x, y = torch.randn(45, n), torch.randn(70, n)
    want = expected(x, y, A, B, owner, slots)
    results = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x_in, y_out in [(x, y.clone()), (x.t().contiguous().t(), y.t().contiguous().t()),
                            (x, y.t().contiguous().t()), (x.t().contiguous().t(), y.clone())]:
            results.append(column_kernel.add_columns(column_kernel.load(), x_in, term, first, count, y_out,
                                                     torch.empty(n * (45 + 70))))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], other) for other in results[1:])
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0][:, 10:12], y[:, 10:12])  # no adapter: left alone


@pytest.mark.parametrize("n", [5, 16, 21])  # a partial block of columns, a full one, one and a part
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_layout", ["feature-major", "row-major"])
def test_lanes_give_each_column_its_own_adapters_term(n, threads, x_layout):
    # a sibling group of three layers fed the same x (as q/k/v): 20 slots, two lane groups; ranks differ per slot
    # and per layer (zeros past a slot's own); slot 4 has ranks on no layer, slot 5 on the first layer only,
    # and the third layer has slots up to 12 only (one lane group of its own)
    ranks = [[4, 8, 2, 0, 5] + [3] * 15, [2, 1, 6, 0, 0] + [2] * 15, [1, 3, 3, 0, 0] + [4] * 7]
    fan_in, fan_outs = 37, [150, 20, 33]
    layers = []
    for seed, (layer_ranks, fan_out) in enumerate(zip(ranks, fan_outs)):
        A, B, _ = factors([r for r in layer_ranks if r], fan_in, fan_out, seed=3 + seed)
        owner = torch.cat([torch.full((r,), k + 1) for k, r in enumerate(layer_ranks) if r])
        layers.append((A, B, owner))
    group = column_kernel.LaneGroup([term_of(*layer) for layer in layers])
    assert group.groups == 2 and group.ranks == 8 + 6 + 4
    slots = torch.tensor([2, 0, 1, 20, 4, 3, 2, 17, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])[:n]
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(fan_in, n, generator=generator)
    ys = [torch.randn(fan_out, n, generator=generator) for fan_out in fan_outs]
    wants = [expected(x, y, *layer, slots) for y, layer in zip(ys, layers)]
    if x_layout == "row-major":
        x = x.t().contiguous().t()
    lane, lane_floats, column_floats = group.lane_columns(slots)
    assert lane[1] == -1 and lane[4] == -1 and lane[0] == 1 and lane_floats > 0 and column_floats > 0
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = column_kernel.add_lanes(column_kernel.load(), x, group, lane, ys,
                                         torch.full((16 * fan_in + 2 * 18 * 16,), float("nan")))
    finally:
        torch.set_num_threads(previous)
    assert all(r is y for r, y in zip(result, ys))
    untouched = (slots == 0) | (slots == 4)
    for y, want in zip(ys, wants):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(y[:, untouched], want[:, untouched])


def test_lanes_outside_the_layers_write_nothing():
    A, B, owner = factors([2, 3], 8, 6)
    group = column_kernel.LaneGroup([term_of(A, B, owner)])
    x, y = torch.randn(8, 2), torch.randn(6, 2)
    before = y.clone()
    kernel, work = column_kernel.load(), torch.empty(16 * 8 + 48)
    for lane in ([0, 16], [-2, 0]):
        with pytest.raises(AssertionError, match="outside"):
            column_kernel.add_lanes(kernel, x, group, torch.tensor(lane), [y], work)
    assert torch.equal(y, before)
    call = column_kernel.lanes_call(kernel, group, torch.tensor([0, 1]), x.shape, [y.shape], work)
    with pytest.raises(ValueError, match="planned shapes"):
        call(torch.randn(8, 3), [torch.randn(6, 3)])
    with pytest.raises(ValueError, match="fp32"):
        call(x.double(), [y])
    with pytest.raises(ValueError, match="do not match"):  # the scratch is too small
        column_kernel.lanes_call(kernel, group, torch.tensor([0, 1]), x.shape, [y.shape], torch.empty(8))
    with pytest.raises(ValueError, match="do not match"):  # one y for a group of one
        column_kernel.lanes_call(kernel, group, torch.tensor([0, 1]), x.shape, [y.shape, y.shape], work)
    with pytest.raises(ValueError, match="contiguous"):  # y's columns
        column_kernel.add_lanes(kernel, x, group, torch.tensor([0, 1]), [y.t().contiguous().t()], work)
    assert torch.equal(y, before)
    with pytest.raises(ValueError, match="same input size"):
        column_kernel.LaneGroup([term_of(A, B, owner), term_of(*factors([2, 3], 9, 6)[:2], owner)])


def test_lane_columns_are_kept_for_the_last_slot_lists():
    A, B, owner = factors([2, 3, 1], 8, 6)
    group = column_kernel.LaneGroup([term_of(A, B, owner)])
    first = group.lane_columns(torch.tensor([1, 0, 3]))
    assert group.lane_columns(torch.tensor([1, 0, 3]))[0] is first[0]  # the same slots: what was worked out
    other = group.lane_columns(torch.tensor([3, 2]))
    assert other[0].tolist() == [2, 1] and other[0] is not first[0]
    for k in range(8):  # eight other slot lists push the first one out
        group.lane_columns(torch.tensor([k % 3 + 1] * (k + 3)))
    again = group.lane_columns(torch.tensor([1, 0, 3]))
    assert again[0] is not first[0] and again[0].tolist() == first[0].tolist() == [0, -1, 2]


def test_lanes_are_weighed_per_block_of_16_columns():
    # 16 adapters of rank 2: a decode step's 16 rows, one per adapter, read the same factors by lanes as column by
    # column; with a 40-token prompt of one adapter beside them the lanes read all 16 adapters' factors for each of
    # 4 blocks of columns, the column kernel the prompt's adapter's once per 4 of its tokens
    A, B, owner = factors([2] * 16, 8, 6)
    group = column_kernel.LaneGroup([term_of(A, B, owner)])
    rows = torch.arange(1, 17)
    _, lane_floats, column_floats = group.lane_columns(rows)
    assert lane_floats == column_floats == 16 * 2 * (8 + 6)
    _, lane_floats, column_floats = group.lane_columns(torch.cat([rows, torch.full((40,), 3)]))
    assert lane_floats == 4 * 16 * 2 * (8 + 6) and column_floats == (15 + 1 + 10) * 2 * (8 + 6)
