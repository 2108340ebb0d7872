"""decode_linear: a decode step's few rows multiplied as (W x^T)^T, equal to F.linear up to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.lora.base import FEW_ROWS, ROW_MAJOR_ROWS, decode_linear, weight_major_product


def ops_of(fn, *args):
    """fn(*args) and the names of the aten ops it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {event.name for event in prof.events()}


@pytest.mark.parametrize("shape", [(16, 40), (4, 1, 40), (2, 3, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_take_the_weight_major_product_and_equal_f_linear(shape, with_bias):
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


def test_many_rows_and_autograd_keep_f_linear_exactly():
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


@pytest.mark.parametrize("rows", [1, *ROW_MAJOR_ROWS, 4])
def test_two_or_three_rows_multiply_as_x_w_transposed_and_equal_the_product(rows):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, rows, generator=generator)  # feature-major, as a decode step keeps them
    weight, bias = torch.randn(24, 40, generator=generator), torch.randn(24, generator=generator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = weight_major_product(x, weight, bias)
    shapes = [event.input_shapes for event in prof.events() if event.name == "aten::mm"]
    assert shapes == [[[rows, 40], [40, 24]] if rows in ROW_MAJOR_ROWS else [[24, 40], [40, rows]]]
    assert out.shape == (24, rows)
    assert torch.allclose(out, weight @ x + bias[:, None], atol=1e-5)
    assert torch.allclose(decode_linear(x.t(), weight, bias), F.linear(x.t(), weight, bias), atol=1e-5)
