"""Adapter factors as int8 values times a power of two per rank: rounded to, and found again exactly."""

from __future__ import annotations

import pytest
import torch

from lorakit.lora.int8_factors import int8_rows, round_rows


def test_rows_round_to_the_nearest_int8_value_at_the_smallest_power_of_two_that_holds_them():
    magnitudes = torch.tensor([1e-3, 0.1, 1, 3, 50, 1e4])[:, None]
    v = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * magnitudes
    rounded = round_rows(v)
    q, c = int8_rows(rounded, torch.ones(6))
    assert q.dtype == torch.int8 and torch.equal(q.float() * c[:, None], rounded)
    assert torch.equal(torch.exp2(torch.log2(c).round()), c)
    assert bool(((rounded - v).abs() <= c[:, None] / 2).all())
    assert bool((q.abs().amax(dim=1) > 63).all())  # a smaller power of two would not hold the peak
    q, c = int8_rows(round_rows(torch.tensor([[127 / 128, -0.5, 0.25], [1.0, -0.5, 0.25]])), torch.ones(2))
    assert c.tolist() == [2**-7, 2**-6] and q.tolist() == [[127, -64, 32], [64, -32, 16]]  # 128 steps do not fit
    assert torch.equal(round_rows(rounded), rounded)
    zeros = torch.zeros(2, 5)
    assert torch.equal(round_rows(zeros), zeros) and torch.equal(int8_rows(zeros, torch.ones(2))[0], zeros.char())


def test_scales_are_found_again_after_a_scaling_multiplies_the_rows():
    rounded = round_rows(torch.randn(8, 33, generator=torch.Generator().manual_seed(1)))
    s = torch.tensor([0.37, 1.75, 2.0, 1 / 3, 0.5, 16.0, 0.1, 3.0])
    scaled = rounded * s[:, None]  # (s B) as the mixed batch builds it, rounded to fp32
    q, c = int8_rows(scaled, s)
    assert torch.equal(q.float() * c[:, None], scaled)
    assert int8_rows(scaled, torch.ones(8)) is None  # without the scaling the values are not int8 times 2^e


@pytest.mark.parametrize("values", ["unrounded", "bf16", "nan", "wide"])
def test_values_that_are_not_int8_times_a_power_of_two_are_not_taken_for_them(values):
    v = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    if values == "bf16":
        v = v.bfloat16().float()
    elif values == "nan":
        v = round_rows(v)
        v[1, 3] = float("nan")
    elif values == "wide":  # 255 distinct steps of one power of two: more than int8 holds
        v = torch.arange(-127, 128, dtype=torch.float32)[None].repeat(4, 1) / 2 + 0.5
    assert int8_rows(v, torch.ones(4)) is None
    assert int8_rows(v.double(), torch.ones(4)) is None
