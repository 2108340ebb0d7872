"""lorakit's decode-step product kernel: W x for a few columns, equal to the float64 product, each column's
result independent of the others."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lorakit.lora import weight_kernel

pytestmark = pytest.mark.skipif(weight_kernel.load() is None, reason="no C compiler here to build the kernel")


@contextmanager
def torch_threads(threads: int):
    """torch's (and the kernels') thread count set to `threads` inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# (product, columns, inputs): the 16-column kernel over partial blocks of 16 columns, a full one, several (37 rows:
# a last block of 8 rows holds 5); the few-columns one over 1 to 4 columns, whole vectors of 16 inputs and 13 more
# after them (a last block of 4 rows holds 1)
PRODUCTS = [("product", n, 23) for n in [1, 5, 16, 17, 40]]
PRODUCTS += [("few_columns_product", n, fan_in) for n in range(1, weight_kernel.FEW_COLUMNS + 1) for fan_in in [16, 45]]


@pytest.mark.parametrize(("name", "n", "fan_in"), PRODUCTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_product_equals_float64_and_each_column_is_its_own(name, n, fan_in, threads):
    product = getattr(weight_kernel, name)
    generator = torch.Generator().manual_seed(10 * n + fan_in)
    weight = torch.randn(37, fan_in, generator=generator)
    x = torch.randn(fan_in, n, generator=generator)
    with torch_threads(threads):
        out = product(x, weight)
        alone = product(x[:, -1:].clone(), weight)
    assert out.shape == (37, n)
    torch.testing.assert_close(out, (weight.double() @ x.double()).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, -1:], alone)  # the same bits, whatever else the batch holds
    strided = product(x.t().contiguous().t(), weight)  # x read as stored, or copied
    assert torch.equal(strided, out)


def test_wrong_inputs_are_refused():
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="does not take"):
        weight_kernel.product(torch.randn(5, 3), weight)
    with pytest.raises(ValueError, match="fp32"):
        weight_kernel.product(torch.randn(4, 3).double(), weight)
    assert weight_kernel.product(torch.randn(4, 0), weight).shape == (8, 0)


def test_the_few_columns_product_refuses_what_it_cannot_take():
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="1 to 4 columns"):
        weight_kernel.few_columns_product(torch.randn(4, weight_kernel.FEW_COLUMNS + 1), weight)
    with pytest.raises(ValueError, match="1 to 4 columns"):
        weight_kernel.few_columns_product(torch.randn(4, 0), weight)
    with pytest.raises(ValueError, match="does not take"):
        weight_kernel.few_columns_product(torch.randn(5, 2), weight)
    with pytest.raises(ValueError, match="fp32"):
        weight_kernel.few_columns_product(torch.randn(4, 2).double(), weight)


def int8_weight(seed: int, fan_in: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """A generator seeded `seed`, an int8 weight of 37 rows (a last block of 8 holds 5) and its per-row scales."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (37, fan_in), generator=generator, dtype=torch.int8)
    return generator, weight, torch.rand(37, generator=generator) / 100


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_int8_product_equals_float64_of_the_scaled_weight(n, threads):
    generator, weight, scales = int8_weight(n, 48)  # 48 inputs: 3 groups of 16
    x = torch.randn(48, n, generator=generator)
    with torch_threads(threads):
        out = weight_kernel.int8_product(x, weight, scales)
        alone = weight_kernel.int8_product(x[:, -1:].clone(), weight, scales)
    want = (scales.double()[:, None] * weight.double()) @ x.double()
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, -1:], alone)


def test_the_int8_product_refuses_what_it_cannot_take():
    x, scales = torch.randn(24, 3), torch.ones(8)
    with pytest.raises(ValueError, match="multiple of 16"):
        weight_kernel.int8_product(x, torch.zeros(8, 24, dtype=torch.int8), scales)
    with pytest.raises(ValueError, match="int8 weight"):
        weight_kernel.int8_product(torch.randn(32, 3), torch.zeros(8, 32), scales)


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """diag(scales) Q xq in float64: x rounded per column and block of 32 inputs (d = max |x| / 127, q = x / d rounded
    half to even), each block's integer sums exact, then scaled by its d."""
    fan_in, n = x.shape
    blocks = x.view(fan_in // 32, 32, n)
    amax = blocks.abs().amax(1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    assert q.abs().max() <= 127
    sums = torch.einsum("obi,bin->obn", weight.view(len(weight), fan_in // 32, 32).double(), q.double())
    return scales.double()[:, None] * (sums * (amax[:, 0] / 127).double()[None]).sum(1)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_w8a8_product_sums_the_weight_times_the_inputs_rounded_per_block(n, threads):
    generator, weight, scales = int8_weight(n, 96)  # 96 inputs: 3 blocks of 32
    x = torch.randn(96, n, generator=generator) * torch.logspace(-2, 2, 96)[:, None]  # blocks of different sizes
    x[:32, 0] = 0  # a block of zeros: scale 0, no division by it
    with torch_threads(threads):
        out = weight_kernel.w8a8_product(x, weight, scales)
        alone = weight_kernel.w8a8_product(x[:, -1:].clone(), weight, scales)
    torch.testing.assert_close(out, w8a8_reference(x, weight, scales).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, -1:], alone)  # the same bits, whatever else the batch holds
    exact = (scales.double()[:, None] * weight.double()) @ x.double()
    error = (out.double() - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.02  # rounded inputs: close to the product, not equal


@pytest.mark.parametrize("fan_in", [64, 96, 160])  # blocks of 32 in pairs only, and one left over
@pytest.mark.parametrize("threads", [1, 2])
def test_the_w8a8_product_of_a_few_columns_has_the_bits_of_sixteen(fan_in, threads):
    generator, weight, scales = int8_weight(fan_in, fan_in)  # 37 rows: a last block of 16 holds 5
    x = torch.randn(fan_in, 17, generator=generator)
    with torch_threads(threads):
        many = weight_kernel.w8a8_product(x, weight, scales)  # the 16-column loop
        for n in range(1, weight_kernel.FEW_COLUMNS + 1):  # the few-columns loop (where the CPU has VNNI)
            assert torch.equal(weight_kernel.w8a8_product(x[:, :n].contiguous(), weight, scales), many[:, :n])
    torch.testing.assert_close(many, w8a8_reference(x, weight, scales).float(), rtol=1e-5, atol=1e-6)


def test_the_w8a8_product_refuses_what_it_cannot_take():
    scales = torch.ones(8)
    with pytest.raises(ValueError, match="multiple of 32"):
        weight_kernel.w8a8_product(torch.randn(48, 3), torch.zeros(8, 48, dtype=torch.int8), scales)
    with pytest.raises(ValueError, match="int8 weight"):
        weight_kernel.w8a8_product(torch.randn(32, 3), torch.zeros(8, 32), scales)
