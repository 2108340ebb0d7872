"""lorakit's group decode-step kernel: each member's W x + b + each column's LoRA term in one pass, equal to the
float64 result, the bases the same to the bit as the product kernel's; bad arguments refused, nothing written."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit.lora import column_kernel, group_kernel, weight_kernel
from lorakit.lora.int8_factors import round_rows
from test_column_kernel import expected, factors

pytestmark = pytest.mark.skipif(group_kernel.load() is None, reason="no C compiler here to build the kernel")


def sibling_group(fan_in: int = 37, fan_outs=(150, 20, 33), biases=(True, False, True), bf16: bool = False,
                  int8: bool = False):
    """Three layers fed the same x (as q/k/v) over 20 slots, two lane groups, ranks differing per slot and per layer
    (slot 4 on no layer, slot 5 on the first only, the third up to slot 12), with their frozen linears; `bf16`:
    every factor rounded to a bf16 value; `int8`: each rank of A and of B to int8 values times a power of two, B
    then multiplied by each slot's own scaling (as s B)."""
    ranks = [[4, 8, 2, 0, 5] + [3] * 15, [2, 1, 6, 0, 0] + [2] * 15, [1, 3, 3, 0, 0] + [4] * 7]
    layers, bases, terms = [], [], []
    for seed, (layer_ranks, fan_out, bias) in enumerate(zip(ranks, fan_outs, biases)):
        A, B, _ = factors([r for r in layer_ranks if r], fan_in, fan_out, seed=3 + seed)
        owner = torch.cat([torch.full((r,), k + 1) for k, r in enumerate(layer_ranks) if r])
        scaling = 0.3 + owner / 7 if int8 else torch.ones(len(owner))
        if bf16:
            A, B = A.bfloat16().float(), B.bfloat16().float()
        if int8:
            A, B = round_rows(A), round_rows(B.t()).t() * scaling
        layers.append((A, B, owner))
        terms.append(column_kernel.ColumnTerm(A, B.t(), owner, scaling))
        torch.manual_seed(seed)
        bases.append(nn.Linear(fan_in, fan_out, bias=bias).requires_grad_(False))
    return column_kernel.LaneGroup(terms), layers, bases


def scratch(group, fan_in: int) -> torch.Tensor:
    return torch.full((16 * fan_in + group.groups * group.ranks * 16,), float("nan"))


@pytest.mark.parametrize("n", [1, 5, 16])  # one column, a partial block, a full one
@pytest.mark.parametrize("threads", [1, 2])
def test_each_member_gets_its_base_and_each_column_its_adapters_term(n, threads):
    group, layers, bases = sibling_group()
    slots = torch.tensor([2, 0, 1, 20, 4, 3, 2, 17, 1, 5, 6, 7, 8, 9, 10, 11])[:n]
    x = torch.randn(37, n, generator=torch.Generator().manual_seed(n))
    lane = group.lane_columns(slots)[0]
    call = group_kernel.group_call(group_kernel.load(), group, bases, 37, scratch(group, 37))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ys = call(x, lane)
        again = call(x, lane)
    finally:
        torch.set_num_threads(previous)
    untouched = (slots == 0) | (slots == 4)
    for y, y_again, base, layer in zip(ys, again, bases, layers):
        plain = (base.weight.double() @ x.double()).float()
        if base.bias is not None:
            plain += base.bias[:, None]
        torch.testing.assert_close(y, expected(x, plain, *layer, slots), rtol=1e-5, atol=1e-5)
        assert torch.equal(y, y_again)
        # the columns without a term: the product kernel's bits, plus the bias as the decode step adds it
        bits = weight_kernel.product(x, base.weight)
        if base.bias is not None:
            bits += base.bias[:, None]
        assert torch.equal(y[:, untouched], bits[:, untouched])


def test_without_terms_the_bases_are_the_product_kernels_bits():
    group, _, bases = sibling_group(fan_in=64, fan_outs=(96, 40, 24))  # several blocks of 8 rows per member
    x = torch.randn(64, 16)
    ys = group_kernel.group_call(group_kernel.load(), group, bases, 64, scratch(group, 64))(x, torch.full((16,), -1))
    for y, base in zip(ys, bases):
        bits = weight_kernel.product(x, base.weight)
        if base.bias is not None:
            bits += base.bias[:, None]
        assert torch.equal(y, bits)


def test_bad_arguments_are_refused():
    group, _, bases = sibling_group()
    function, work = group_kernel.load(), scratch(group, 37)
    lane = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="do not match"):  # a base of another width
        group_kernel.group_call(function, group, [nn.Linear(36, 150), *bases[1:]], 37, work)
    with pytest.raises(ValueError, match="do not match"):  # a half-type base
        group_kernel.group_call(function, group, [nn.Linear(37, 150).half(), *bases[1:]], 37, work)
    with pytest.raises(ValueError, match="do not match"):  # the scratch too small
        group_kernel.group_call(function, group, bases, 37, torch.empty(8))
    call = group_kernel.group_call(function, group, bases, 37, work)
    with pytest.raises(AssertionError, match="outside"):  # a lane past the two groups
        call(torch.randn(37, 2), torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="fp32 CPU"):  # more columns than one block
        call(torch.randn(37, 17), torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match="fp32 CPU"):
        call(torch.randn(37, 3), lane)
    with pytest.raises(ValueError, match="fp32 CPU"):
        call(torch.randn(37, 2).double(), lane)
    with pytest.raises(ValueError, match="int64"):
        call(torch.randn(37, 2), lane.int())
    # one call serves any columns' lanes: the lanes of each step of a batch whose rows change
    assert torch.equal(call(torch.ones(37, 1), lane[1:])[0], call(torch.ones(37, 2), lane)[0][:, 1:])


def narrow_group(dtype: torch.dtype):
    """A sibling group whose factors the lanes hold in `dtype` (bf16 values; int8 values times powers of two), its
    layers and bases, and the same group in fp32 lanes of the same products (int8: each lane rank's two scales
    on its A, none in SL)."""
    group, layers, bases = sibling_group(bf16=dtype == torch.bfloat16, int8=dtype == torch.int8)
    wide = copy.copy(group)
    scales = 1 if group.SL is None else group.SL[:, :, None, :]
    wide.AL, wide.BL, wide.SL = (group.AL.float() * scales).contiguous(), [BL.float() for BL in group.BL], None
    return group, layers, bases, wide


def test_factors_of_a_narrow_type_are_kept_in_lanes_of_that_type():
    bf16, int8, fp32 = (sibling_group(bf16=True)[0], sibling_group(int8=True)[0], sibling_group()[0])
    assert bf16.AL.dtype == torch.bfloat16 and all(BL.dtype == torch.bfloat16 for BL in bf16.BL)  # half the bytes
    assert int8.AL.dtype == torch.int8 and all(BL.dtype == torch.int8 for BL in int8.BL)  # a quarter of the bytes
    assert int8.SL.shape == (int8.groups, int8.ranks, 16) and bf16.SL is None and fp32.SL is None
    assert fp32.AL.dtype == torch.float32  # factors that are neither stay fp32


# bf16 lanes hold the same values as fp32 ones and give the same bits; int8 lanes' scales apply to each rank's sum
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_narrow_lanes_give_the_fp32_lanes_terms(dtype):
    group, layers, bases, wide = narrow_group(dtype)
    slots = torch.tensor([2, 0, 1, 20, 4, 3, 2, 17, 1, 5, 6, 7, 8, 9, 10, 11])
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(3))
    lane = group.lane_columns(slots)[0]
    narrow_pass = group_kernel.group_call(group_kernel.load(dtype), group, bases, 37, scratch(group, 37))
    wide_pass = group_kernel.group_call(group_kernel.load(), wide, bases, 37, scratch(group, 37))
    ys = [torch.randn(out, 16) for out in group.outs]
    narrow_lanes = column_kernel.add_lanes(column_kernel.load(dtype), x, group, lane, [y.clone() for y in ys],
                                           scratch(group, 37))
    wide_lanes = column_kernel.add_lanes(column_kernel.load(), x, wide, lane, [y.clone() for y in ys],
                                         scratch(group, 37))
    plains = [(b.weight.double() @ x.double()).float() + (0 if b.bias is None else b.bias[:, None]) for b in bases]
    for narrow, wide_y, before, layer in [*zip(narrow_pass(x, lane), wide_pass(x, lane), plains, layers),
                                          *zip(narrow_lanes, wide_lanes, ys, layers)]:
        torch.testing.assert_close(narrow, expected(x, before, *layer, slots), rtol=1e-5, atol=1e-5)
        if dtype == torch.bfloat16:
            assert torch.equal(narrow, wide_y)
        else:
            torch.testing.assert_close(narrow, wide_y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):  # narrow lanes through the fp32 build
        group_kernel.group_call(group_kernel.load(), group, bases, 37, scratch(group, 37))
    with pytest.raises(ValueError, match="built for them"):
        column_kernel.add_lanes(column_kernel.load(), x, group, lane, [y.clone() for y in ys], scratch(group, 37))
