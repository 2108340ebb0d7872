"""decode_linear and weight_major_product: a decode step's few rows multiplied as (W x^T)^T, in the layout of x
measured fastest, equal to F.linear up to float rounding."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.lora import base, onednn_linear, weight_kernel
from lorakit.lora.base import FEW_ROWS, LAYOUT_ROWS, LAYOUTS, decode_linear, weight_major_product


def ops_of(fn, *args):
    """fn(*args) and the names of the aten ops it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {event.name for event in prof.events()}


@pytest.mark.parametrize("shape", [(16, 40), (4, 1, 40), (2, 3, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_take_the_weight_major_product_and_equal_f_linear(shape, with_bias, monkeypatch):
    # Up to LAYOUT_ROWS rows the product reads x in the layout this process measured fastest; pinned to "columns",
    # it multiplies exactly W rows^T, whatever a busy machine's measurement would have picked.
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, LAYOUT_ROWS + 1), "columns"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(24, 40, generator=generator)
    bias = torch.randn(24, generator=generator) if with_bias else None
    with torch.no_grad():
        out, ops = ops_of(decode_linear, x, weight, bias)
    assert "aten::mm" in ops and "aten::linear" not in ops  # the weight-major product, not F.linear
    rows = x.reshape(-1, 40)
    weight_major = (weight @ rows.t()).t().reshape(*shape[:-1], 24) + (bias if with_bias else 0)
    assert out.shape == (*shape[:-1], 24) and out.is_contiguous()
    assert torch.equal(out, weight_major)
    assert torch.allclose(out, F.linear(x, weight, bias), atol=1e-5)


def test_a_half_weight_answers_in_the_inputs_type():
    x = torch.randn(8, 32)
    weight = torch.randn(16, 32).bfloat16()
    with torch.no_grad():
        out = decode_linear(x, weight, None)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.linear(x.bfloat16(), weight).float(), atol=1e-2)


def test_many_rows_and_autograd_keep_f_linear_exactly(monkeypatch):
    monkeypatch.setattr(onednn_linear, "faster", lambda: False)  # where oneDNN is not the faster (test_onednn_linear)
    weight = torch.randn(16, 32)
    many = torch.randn(FEW_ROWS + 1, 32)
    with torch.no_grad():
        out, ops = ops_of(decode_linear, many, weight, None)
    assert "aten::linear" in ops and torch.equal(out, F.linear(many, weight))
    few = torch.randn(4, 32, requires_grad=True)
    out = decode_linear(few, weight, None)
    assert torch.equal(out, F.linear(few, weight))
    out.sum().backward()
    assert torch.allclose(few.grad, weight.sum(0).expand(4, 32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, LAYOUT_ROWS])
def test_each_decode_layout_reads_x_as_it_says_and_equals_the_product(rows, layout, monkeypatch):
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, LAYOUT_ROWS + 1), layout))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, rows, generator=generator)  # feature-major, as a decode step keeps them
    weight, bias = torch.randn(24, 40, generator=generator), torch.randn(24, generator=generator)
    if layout in ("kernel", "few") and weight_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    with _Products() as seen, torch.no_grad():  # as in a decode step (the kernels have no autograd)
        out = weight_major_product(x, weight, bias)
    columns = max(rows, 2)  # one row goes in as two copies of itself
    expected = {
        "weight": [((24, 40), (40, rows), (rows, 1))],
        "columns": [((24, 40), (40, columns), (1, 40))],
        "rows": [((rows, 40), (40, 24), (1, 40))],
        "kernel": [],  # lorakit's own product, no aten::mm
        # lorakit's own product for a few rows; past them W x as stored
        "few": [] if rows <= weight_kernel.FEW_COLUMNS else [((24, 40), (40, rows), (rows, 1))],
    }[layout]
    assert seen == expected
    assert out.shape == (24, rows)
    assert torch.allclose(out, weight @ x + bias[:, None], atol=1e-5)
    assert torch.allclose(decode_linear(x.t(), weight, bias), F.linear(x.t(), weight, bias), atol=1e-5)


@pytest.mark.parametrize("at_most", ["columns", "kernel"])
def test_more_rows_than_the_measured_layouts_multiply_as_stored_or_through_the_kernel(at_most, monkeypatch):
    # past LAYOUT_ROWS rows the kernel goes on where it was the choice at LAYOUT_ROWS; else W x as stored
    if at_most == "kernel" and weight_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, LAYOUT_ROWS + 1), at_most))
    x, weight = torch.randn(40, LAYOUT_ROWS + 5), torch.randn(24, 40)
    with _Products() as seen, torch.no_grad():
        out = weight_major_product(x, weight, None)
    if at_most == "kernel":
        assert seen == []
    else:
        assert seen == [((24, 40), (40, LAYOUT_ROWS + 5), (LAYOUT_ROWS + 5, 1))]
    assert torch.allclose(out, weight @ x, atol=1e-5)
    few = torch.randn(3, 40, requires_grad=True)  # under autograd: never the kernel
    with _Products() as seen:
        weight_major_product(few.t(), weight, None).sum().backward()
    assert seen and few.grad is not None


def test_layouts_are_measured_once_per_process_for_every_row_count(monkeypatch):
    monkeypatch.setattr(base, "_layouts", {})
    calls = []
    every_count = dict.fromkeys(range(1, LAYOUT_ROWS + 1), "rows")
    monkeypatch.setattr(base, "measure_layouts", lambda: calls.append(1) or every_count)
    weight_major_product(torch.randn(40, 2), torch.randn(24, 40), None)
    weight_major_product(torch.randn(40, 3), torch.randn(24, 40), None)
    assert calls == [1]


def test_layouts_are_timed_once_per_machine_and_read_back_by_every_process(monkeypatch):
    """The first process to ask times them; a later one (a fresh process) reads its answer, whatever its own
    timing would say, so that two servers or two evaluations on one machine round alike."""
    timed_here = {rows: LAYOUTS[rows % 3] for rows in range(1, LAYOUT_ROWS + 1)}
    monkeypatch.setattr(base, "_layouts", {})
    monkeypatch.setattr(base, "measure_layouts", lambda: timed_here)
    assert base.decode_layouts() == timed_here
    script = "from lorakit.lora import base; print(sorted(base.decode_layouts().items()))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(sorted(timed_here.items()))


def test_a_kept_answer_that_names_no_known_layout_is_timed_again(monkeypatch):
    from lorakit.machine_choices import remembered

    own = weight_kernel.enabled() and weight_kernel.load() is not None
    remembered("decode-layouts" + (" with lorakit's products" if own else ""), lambda: {"1": "gone"})
    timed_here = dict.fromkeys(range(1, LAYOUT_ROWS + 1), "rows")
    monkeypatch.setattr(base, "_layouts", {})
    monkeypatch.setattr(base, "measure_layouts", lambda: timed_here)
    assert base.decode_layouts() == timed_here


def test_measure_layouts_names_a_layout_for_each_row_count():
    chosen = base.measure_layouts(rounds=1)
    assert sorted(chosen) == list(range(1, LAYOUT_ROWS + 1))
    assert set(chosen.values()) <= set(LAYOUTS)


def test_measure_layouts_takes_the_fastest(monkeypatch):
    """With products made to take 1 ms (weight), 2 ms (columns), 0.2 ms (rows), 0.5 ms (kernel) and 0.1 ms (few),
    the counts up to FEW_COLUMNS take few, then those that time the BLAS layouts rows, the others the kernel (where
    the kernels are not built: rows, then the weight)."""
    pause = {"weight": 1e-3, "columns": 2e-3, "rows": 2e-4, "kernel": 5e-4, "few": 1e-4}
    monkeypatch.setattr(base, "_product", lambda x, weight, layout: time.sleep(pause[layout]))
    built = weight_kernel.enabled() and weight_kernel.load() is not None
    expected = {rows: "rows" if rows <= base.BLAS_LAYOUT_ROWS else "kernel" if built else "weight"
                for rows in range(1, LAYOUT_ROWS + 1)}
    if built:
        expected.update(dict.fromkeys(range(1, weight_kernel.FEW_COLUMNS + 1), "few"))
    assert base.measure_layouts(rounds=1) == expected


class _Products(TorchDispatchMode):
    """Records (shape of W-or-x, shape of the second operand, its strides) of every aten.mm inside the block."""

    def __enter__(self):
        super().__enter__()
        self.seen = []
        return self.seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.seen.append((tuple(args[0].shape), tuple(args[1].shape), tuple(args[1].stride())))
        return func(*args, **(kwargs or {}))


def test_no_rows_give_an_empty_product():
    assert weight_major_product(torch.randn(40, 0), torch.randn(24, 40), torch.randn(24)).shape == (24, 0)


@pytest.mark.parametrize("from_rows", [1, 17])  # the int8 kernel from 1 row on, or never
def test_int8_weights_multiply_through_the_kernel_from_its_row_count(from_rows, monkeypatch):
    from lorakit.infer.int8_weights import int8_linear_from

    if weight_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    monkeypatch.setattr(base, "_int8_rows", [from_rows])
    calls = []
    real = weight_kernel.int8_product
    monkeypatch.setattr(weight_kernel, "int8_product", lambda *args: calls.append(1) or real(*args))
    module = int8_linear_from(nn.Linear(32, 24))
    x = torch.randn(32, 5)
    with torch.no_grad():
        out = base.frozen_features(module, x)
    want = base.int8_linear(x.t(), module.weight, module.weight_scales, module.bias).t()  # x and out in bf16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    assert len(calls) == (from_rows == 1)
    scaled = module.weight.double() * module.weight_scales.double()[:, None]
    exact = scaled @ x.double() + module.bias.double()[:, None]
    if from_rows == 1:  # fp32 x, fp32 sums: closer to the scaled weight's product than the bf16 path
        torch.testing.assert_close(out, exact.float(), rtol=1e-5, atol=1e-5)


def test_int8_kernel_rows_are_timed_once_per_machine_and_read_back_by_every_process(monkeypatch):
    if weight_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    monkeypatch.setattr(base, "_int8_rows", [])
    monkeypatch.setattr(base, "_measure_int8_rows", lambda rounds: 3)  # a count the timing never gives
    assert base.int8_kernel_rows() == 3
    script = "from lorakit.lora import base; print(base.int8_kernel_rows())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("wins_from, expected", [(1, 1), (8, 8), (17, LAYOUT_ROWS + 1), (5, 8)])
def test_int8_kernel_rows_is_where_the_kernel_won_the_timing(wins_from, expected, monkeypatch):
    """The fewest of the timed row counts from which the kernel won at every one timed (timings stood in for: the
    timing itself is lora/turns.py's, tested there)."""
    if weight_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    timed = []

    def times(ways, rounds):
        rows = ways[True].args[0][512].shape[1]  # products(inputs, kernel): inputs by width, (width, rows) each
        timed.append(rows)
        return {False: 1.0, True: 0.5 if rows >= wins_from else 2.0}

    monkeypatch.setattr(base, "best_times", times)
    assert base._measure_int8_rows(rounds=1) == expected
    assert timed == [1, 2, 4, 8, 12, 16]
