"""The rank-wide products' kernel: x A^T and u^T g against float64, on any thread count, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from conftest import on_threads
from lorakit.lora import rank_kernel
from lorakit.lora.fused_siblings import siblings_backward, siblings_forward
from lorakit.lora.rank_kernel import rank_gradient, rank_product
from lorakit.lora.variants.lora import LoraAdapter, lora_backward, lora_forward

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


def _lora_step(weight: torch.Tensor, siblings: bool) -> list[torch.Tensor]:
    """A fused path's forward and backward by hand, no dropout: its output and every gradient."""
    generator = torch.Generator().manual_seed(3)
    x, grad = torch.randn(40, 32, generator=generator), torch.randn(40, weight.shape[0], generator=generator)
    if not siblings:
        A, B = torch.randn(8, 32, generator=generator), torch.randn(weight.shape[0], 8, generator=generator)
        y, u, keep = lora_forward(x, weight, None, A, B, 2.0, 0.0, True)
        return [y, *lora_backward(grad, x, weight, A, B, u, keep, 2.0, 0.0)]
    adapters = [LoraAdapter(32, 24, 8, 16, 0.0, False), LoraAdapter(32, weight.shape[0] - 24, 8, 16, 0.0, False)]
    params = [torch.randn(p.shape, generator=generator) for a in adapters for p in (a.A, a.B)]
    y, saved = siblings_forward(x, weight, None, adapters, params, True)
    grad_x, grads = siblings_backward(grad, x, weight, adapters, params, saved, True)
    return [y, grad_x, *grads]


@pytest.mark.parametrize("siblings", [False, True], ids=["one layer", "siblings"])
def test_a_half_base_keeps_torchs_products_and_an_fp32_base_takes_the_kernel(monkeypatch, siblings):
    weight = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    library, calls = rank_kernel.load(), []
    monkeypatch.setattr(rank_kernel, "load", lambda: calls.append(1) or library)
    with torch.no_grad():
        _lora_step(weight, siblings)
        assert calls  # an fp32 base: the kernel's products
        calls.clear()
        half = _lora_step(weight.bfloat16(), siblings)
        assert not calls  # a half base: torch's, bit for bit what the kernel turned off gives
        monkeypatch.setenv("LORAKIT_RANK_KERNEL", "0")
        for ours, off in zip(half, _lora_step(weight.bfloat16(), siblings), strict=True):
            assert torch.equal(ours, off)
