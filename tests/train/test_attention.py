"""Grouped-query attention without key/value copies against transformers' SDPA path."""

from __future__ import annotations

import pytest
import torch

import lorakit
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_attention_gives_the_same_loss_and_gradients(family):
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


def test_generation_is_unchanged_with_grouped_attention(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    expected = model.generate(input_ids, max_new_tokens=6, do_sample=False)
    use_grouped_attention(model)
    assert torch.equal(model.generate(input_ids, max_new_tokens=6, do_sample=False), expected)


def test_models_without_grouped_heads_keep_their_attention():
    model = TINY_MODELS["gpt2"]()
    assert not use_grouped_attention(model)
    assert model.config._attn_implementation != NAME
