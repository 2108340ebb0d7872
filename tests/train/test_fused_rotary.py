"""The fused rotary embedding: transformers' outputs bit for bit, and the gradients of plain autograd."""

from __future__ import annotations

import sys

import pytest
import torch

from lorakit.train.fused_rotary import FusedRotary, apply_rotary_pos_emb, restore_rotary, use_fused_rotary
from conftest import TINY_MODELS


def _plain(q, k, cos, sin):
    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_equals_plain_autograd_bit_for_bit(dtype):
    """Outputs and gradients by halves equal the rot(x) expression's (and autograd through it) to the bit."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 6, 16, generator=generator).to(dtype).requires_grad_()
    cos, sin = (torch.randn(2, 1, 6, 16, generator=generator).to(dtype) for _ in range(2))  # as the model casts
    plain = _plain(q, k, cos, sin)
    gq, gk = (torch.randn(p.shape, generator=generator).to(dtype) for p in plain)
    fused = FusedRotary.apply(q, k, cos, sin)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(plain, fused))
    expected = torch.autograd.grad(plain, (q, k), (gq, gk))
    got = torch.autograd.grad(fused, (q, k), (gq, gk))
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(expected, got))
    with torch.no_grad():  # generation's path
        assert all(torch.equal(a, b) for a, b in zip(plain, apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])))


def test_swapped_in_for_llama_with_equal_outputs(input_ids):
    model = TINY_MODELS["llama"]()
    module = sys.modules[type(model).__module__]
    restore_rotary(model)  # transformers' own, even if an earlier test swapped it
    assert module.apply_rotary_pos_emb is not apply_rotary_pos_emb
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    assert use_fused_rotary(model) and module.apply_rotary_pos_emb is apply_rotary_pos_emb
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)


def test_architectures_without_the_function_are_left_alone():
    assert use_fused_rotary(TINY_MODELS["gpt2"]()) is False
