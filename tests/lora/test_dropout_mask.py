"""keep_mask: torch.rand_like(x) >= p drawn by lorakit's kernel from the same generator, the same masks to the bit,
and the generator left where rand_like leaves it."""

from __future__ import annotations

import pytest
import torch

from lorakit.lora import dropout_mask
from lorakit.lora.dropout_mask import keep_mask

needs_kernel = pytest.mark.skipif(dropout_mask._load() is None, reason="no C compiler here to build the kernel")


def _drawn_by_torch(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rand_like's mask from the generator's current state, and the state it leaves; the state is put back."""
    state = torch.get_rng_state()
    want = torch.rand_like(x) >= p
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    return want, after


@needs_kernel
@pytest.mark.parametrize("draws_before", [0, 1, 623, 1000])  # a fresh seed's state, and every place in a twist
@pytest.mark.parametrize("shape", [(0,), (1,), (623,), (624,), (625,), (3, 1249), (474, 576)])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.999, 1e-9])
def test_the_mask_and_the_generator_after_it_are_rand_likes(draws_before, shape, p):
    assert dropout_mask._works()
    torch.manual_seed(7)
    torch.rand(draws_before)
    x = torch.empty(shape)
    want, after = _drawn_by_torch(x, p)
    got = keep_mask(x, p)
    assert got.dtype == torch.bool and got.shape == x.shape and torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), after)
    follow = torch.rand(700)  # the next draws continue the same stream
    torch.set_rng_state(after)
    assert torch.equal(follow, torch.rand(700))


@needs_kernel
def test_inputs_the_kernel_does_not_draw_for_go_through_rand_like(monkeypatch):
    """A half-type input (rand_like draws fewer bits a value), a non-contiguous one and the switch off take
    rand_like itself: the same mask either way."""
    drawn = []
    real = dropout_mask._drawn
    monkeypatch.setattr(dropout_mask, "_drawn", lambda *args: drawn.append(1) or real(*args))
    for x in (torch.empty(40, 30, dtype=torch.bfloat16), torch.empty(30, 40).t()):
        want, _ = _drawn_by_torch(x, 0.2)
        assert torch.equal(keep_mask(x, 0.2), want)
    assert drawn == []
    keep_mask(torch.empty(40, 30), 0.2)
    assert drawn == [1]


def test_a_kernel_that_draws_otherwise_is_found_out_once_and_left_out(monkeypatch):
    """The first call checks the kernel against rand_like; one drawing another mask (here: another threshold, as
    another PyTorch's generator would) is never used, and the generator is as it was."""
    if dropout_mask._load() is None:
        pytest.skip("no C compiler here to build the kernel")
    dropout_mask._works.cache_clear()
    monkeypatch.setattr(dropout_mask, "_threshold", lambda p: 0)  # keeps every element
    try:
        state = torch.get_rng_state()
        assert not dropout_mask._works()
        assert torch.equal(torch.get_rng_state(), state)
        x = torch.empty(200, 50)
        want, _ = _drawn_by_torch(x, 0.5)
        assert torch.equal(keep_mask(x, 0.5), want) and not bool(want.all())
    finally:
        dropout_mask._works.cache_clear()


def _fused_step_with_dropout(monkeypatch, kernel: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss and LoRA gradients of one fused training step of a tiny Llama (every projection adapted, dropout 0.1),
    the dropout masks drawn by the kernel or by rand_like (LORAKIT_DROPOUT_KERNEL=0); and the kernel's draws."""
    import lorakit
    from lorakit.train.lean import use_fused_paths
    from conftest import TINY_MODELS

    monkeypatch.setenv("LORAKIT_DROPOUT_KERNEL", "1" if kernel else "0")
    dropout_mask._works.cache_clear()
    drawn, real = [], dropout_mask._drawn
    monkeypatch.setattr(dropout_mask, "_drawn", lambda *args: drawn.append(1) or real(*args))
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(
        r=4, lora_dropout=0.1, target_modules=targets, init_lora_weights=False)).train()
    assert use_fused_paths(model)["fused_mlps"] > 0
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad], len(drawn)


@needs_kernel
def test_a_fused_training_step_with_dropout_is_the_same_to_the_bit_with_the_kernel(monkeypatch):
    try:
        loss, grads, drawn = _fused_step_with_dropout(monkeypatch, kernel=True)
        assert drawn >= 14  # every layer's mask: 2 layers x 7 projections (the self-check draws one more)
        plain_loss, plain_grads, plain_drawn = _fused_step_with_dropout(monkeypatch, kernel=False)
        assert plain_drawn == 0
    finally:
        dropout_mask._works.cache_clear()
    assert torch.equal(loss, plain_loss)
    for got, want in zip(grads, plain_grads, strict=True):
        assert torch.equal(got, want)


@needs_kernel
def test_the_mask_applied_is_x_times_keep_to_the_bit_in_place_or_not(monkeypatch):
    """dropped(x, keep) and drop_(t, keep) through the kernel equal x * keep and t.mul_(keep), signed zeros, infinities
    and NaNs included; under autograd, and for a half x, they are torch's own ops (the graph is kept)."""
    calls = []
    real = dropout_mask._load().apply_mask
    monkeypatch.setattr(dropout_mask._load(), "apply_mask", lambda *args: calls.append(1) or real(*args))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 129, generator=generator)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    keep = torch.rand(x.shape, generator=generator) >= 0.5
    keep[0, :4] = False
    want = x * keep
    got = dropout_mask.dropped(x, keep)
    assert calls == [1] and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit patterns: -0.0 and NaN alike
    t = x.clone()
    assert dropout_mask.drop_(t, keep) is t and torch.equal(t.view(torch.int32), want.view(torch.int32))
    assert len(calls) == 2
    leaf = x.clone().requires_grad_()
    dropout_mask.dropped(leaf, keep).sum().backward()
    assert torch.equal(leaf.grad, keep.float()) and len(calls) == 2
    half = x.to(torch.bfloat16)
    assert torch.equal(dropout_mask.dropped(half, keep).view(torch.int16), (half * keep).view(torch.int16))
    assert len(calls) == 2
