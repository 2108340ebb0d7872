"""The decode step's RMSNorm and rotary embedding in one C call each: the same numbers as the torch expressions
they stand for (infer/decode_step.py), and None where they do not serve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.infer import step_ops
from lorakit.infer.decode_step import _rotate

pytestmark = pytest.mark.skipif(step_ops._library() is None, reason="no C compiler here to build the kernels")


@pytest.mark.parametrize(("features", "columns"), [(576, 1), (576, 16), (37, 3), (64, 300)])  # 300: two chunks
def test_rms_norm_equals_the_torch_expression(features, columns):
    generator = torch.Generator().manual_seed(features + columns)
    x, weight = torch.randn(features, columns, generator=generator), torch.randn(features, generator=generator)
    expected = weight[:, None] * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5))
    with torch.no_grad():  # as in a decode step: a model's norm weight is a parameter
        out = step_ops.rms_norm(x, nn.Parameter(weight), 1e-5)
    assert out.shape == (features, columns)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # the squares summed in another order
    assert torch.equal(step_ops.rms_norm(x.t().contiguous().t(), weight, 1e-5), out)  # x read as stored, or copied
    alone = step_ops.rms_norm(x[:, -1:].contiguous(), weight, 1e-5)
    assert torch.equal(alone, out[:, -1:])  # a column's bits whatever the others: normed side by side, not mixed


@pytest.mark.parametrize(("heads", "head_dim", "columns"), [(9, 64, 1), (3, 64, 16), (2, 8, 5)])
def test_rotate_equals_the_torch_expression_to_the_bit(heads, head_dim, columns):
    generator = torch.Generator().manual_seed(heads * head_dim + columns)
    x = torch.randn(heads * head_dim, columns, generator=generator)  # a projection's feature-major output
    cos, sin = torch.randn(2, columns, 1, head_dim, generator=generator)
    out = step_ops.rotate(x, heads, head_dim, cos, sin)
    assert out.shape == (columns, heads, head_dim) and out.is_contiguous()
    assert torch.equal(out, _rotate(x.view(heads, head_dim, -1).permute(2, 0, 1), cos, sin))


def test_what_they_do_not_take_is_left_to_torch():
    x, weight, cos = torch.randn(16, 2), torch.randn(16), torch.randn(2, 1, 8)
    assert step_ops.rms_norm(x.double(), weight, 1e-5) is None
    assert step_ops.rms_norm(x, torch.randn(15), 1e-5) is None
    assert step_ops.rotate(x.bfloat16(), 2, 8, cos, cos) is None
    assert step_ops.rotate(x, 2, 8, torch.randn(3, 1, 8), cos) is None  # positions for 3 columns, x has 2
    assert step_ops.rotate(torch.randn(14, 2), 2, 7, torch.randn(2, 1, 7), torch.randn(2, 1, 7)) is None  # odd D
    tracked = torch.randn(16, 2, requires_grad=True)  # a gradient asked of it: torch computes it (no backward here)
    assert step_ops.rms_norm(tracked, weight, 1e-5) is None and step_ops.rotate(tracked, 2, 8, cos, cos) is None
    with torch.no_grad():
        assert step_ops.rms_norm(tracked, nn.Parameter(weight), 1e-5) is not None
