"""The rank-wide products' kernel: x A^T and u^T g against float64, on any thread count, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from conftest import on_threads
from lorakit.lora import rank_kernel
from lorakit.lora.rank_kernel import rank_gradient, rank_product

pytestmark = pytest.mark.skipif(rank_kernel.load() is None, reason="needs a C compiler")

# (rows, width, ranks): a training step's shape, tails of both loops, a sibling group's 24 ranks, one rank
SHAPES = [(474, 576, 8), (7, 37, 11), (100, 1536, 24), (1, 16, 1), (33, 200, 8)]


@pytest.mark.parametrize("rows, width, ranks", SHAPES)
def test_rank_products_equal_the_sums_on_any_thread_count(rows, width, ranks):
    generator = torch.Generator().manual_seed(rows + width + ranks)
    wide = torch.randn(rows, width + 5, generator=generator)[:, :width]  # strided rows, as a sibling's slice
    A, u = torch.randn(ranks, width, generator=generator), torch.randn(rows, ranks, generator=generator)
    product, gradient = rank_product(wide, A), rank_gradient(wide, u)
    assert product.shape == (rows, ranks) and gradient.shape == (ranks, width)
    for ours, theirs, exact in [(product, wide @ A.T, wide.double() @ A.double().T),
                                (gradient, u.T @ wide, u.double().T @ wide.double())]:  # as close as torch's fp32
        assert (ours.double() - exact).abs().max() <= 4 * (theirs.double() - exact).abs().max() + 1e-6
    for threads in (1, 2):  # each output summed by one thread in one order: the same bits
        assert torch.equal(on_threads(threads, lambda: rank_product(wide, A)), product)
        assert torch.equal(on_threads(threads, lambda: rank_gradient(wide, u)), gradient)


def test_autograd_and_other_types_go_through_torch(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x, A = torch.randn(6, 32, generator=generator, requires_grad=True), torch.randn(4, 32, generator=generator)
    product = rank_product(x, A)
    assert product.grad_fn is not None  # under autograd: torch's product, differentiable
    torch.testing.assert_close(product, x @ A.T)
    half = rank_product(x.detach().bfloat16(), A.bfloat16())
    assert half.dtype == torch.bfloat16
    calls = []
    monkeypatch.setattr(rank_kernel, "load", lambda: calls.append(1))
    monkeypatch.setenv("LORAKIT_RANK_KERNEL", "0")
    with torch.no_grad():
        torch.testing.assert_close(rank_gradient(x, product), product.T @ x)
    assert not calls  # turned off: the library is not even asked for
