"""Grouped-query attention without key/value copies against transformers' SDPA path."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.train import attention
from lorakit.train.attention import NAME, use_grouped_attention
from lorakit.train.loss import causal_lm_loss_sum
from conftest import TINY_MODELS


def _packed_batch():
    """Two rows, each holding two examples: position ids restart, so transformers builds a block mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(8)) + list(range(4))])
    labels = ids.clone()
    labels[:, 0] = labels[:, 5] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@pytest.mark.parametrize("by_example", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_attention_gives_the_same_loss_and_gradients(family, by_example, monkeypatch):
    """Masked, and by example (each example its own causal SDPA), which these short rows take only when a
    call is counted as free."""
    if by_example:
        monkeypatch.setattr(attention, "SPAN_COST", 0)
    calls = []
    run = attention._by_example
    monkeypatch.setattr(attention, "_by_example", lambda *args: calls.append(args[3]) or run(*args))
    model = lorakit.inject(TINY_MODELS[family](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _packed_batch()

    def loss_and_grads():
        loss = causal_lm_loss_sum(model, batch)
        return loss.detach(), torch.autograd.grad(loss, params)

    plain_loss, plain = loss_and_grads()
    assert use_grouped_attention(model)
    assert model.config._attn_implementation == NAME
    grouped_loss, grouped = loss_and_grads()
    assert abs(plain_loss - grouped_loss) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(plain, grouped)) <= 1e-5
    assert calls == ([[[(0, 5), (5, 12)], [(0, 8), (8, 12)]]] * model.config.num_hidden_layers if by_example else [])


def test_only_a_mask_that_is_exactly_the_examples_causal_mask_is_split(monkeypatch):
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    for start, stop in [(0, 3), (3, 7), (7, 8)]:
        mask[0, 0, start:stop, start:stop] = torch.ones(stop - start, stop - start).tril().bool()
    assert attention._spans_of(mask, positions) is None  # 3 calls cost more than one masked row of 8
    monkeypatch.setattr(attention, "SPAN_COST", 0)
    assert attention._spans_of(mask, positions) == [[(0, 3), (3, 7), (7, 8)]]
    padded = mask.clone()
    padded[0, 0, 5, 3] = False  # a hole the position ids do not explain (padding, say): not the examples' mask
    assert attention._spans_of(padded, positions) is None
    assert attention._spans_of(mask, torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0]])) is None  # no example starts at 0


def test_generation_is_unchanged_with_grouped_attention(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    expected = model.generate(input_ids, max_new_tokens=6, do_sample=False)
    use_grouped_attention(model)
    assert torch.equal(model.generate(input_ids, max_new_tokens=6, do_sample=False), expected)


def test_models_without_grouped_heads_keep_their_attention():
    model = TINY_MODELS["gpt2"]()
    assert not use_grouped_attention(model)
    assert model.config._attn_implementation != NAME
