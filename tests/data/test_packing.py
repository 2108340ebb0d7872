"""Packing several examples into one row leaves the loss and its gradients unchanged."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.data.collate import pad_batch
from lorakit.data.packing import pack_batch, plan_rows
from lorakit.train.loss import causal_lm_loss_sum, label_token_count
from conftest import TINY_MODELS


def _examples(n: int = 7, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt, n_response = (int(x) for x in torch.randint(2, 12, (2,), generator=g))
        ids = torch.randint(3, 128, (n_prompt + n_response,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:], "attention_mask": [1] * len(ids)})
    return out


def test_rows_never_exceed_the_pack_length_and_hold_every_example_once():
    lengths = [9, 3, 14, 7, 7, 2, 30]
    rows = plan_rows(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 or len(row) == 1 for row in rows)


def test_rows_come_out_even_so_little_is_padded():
    lengths = [70, 66, 60, 58, 50, 40, 30, 26]  # 400 tokens: first fit makes rows of 254 and 146
    rows = plan_rows(lengths, 256)
    sizes = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(rows) == 2 and sizes[1] - sizes[0] <= 10
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))


def test_even_rows_never_overfill_and_fall_back_to_first_fit():
    lengths = [200, 120, 120, 16]  # dealing would put 120 + 120 + 16 = 256 against 200: still fits
    assert all(sum(lengths[i] for i in row) <= 256 for row in plan_rows(lengths, 256))
    lengths = [250, 130, 130]  # 3 rows either way
    assert len(plan_rows(lengths, 256)) == 3
    lengths = [300, 10, 10]  # the long example keeps a row of its own
    rows = plan_rows(lengths, 256)
    assert [0] in rows and all(sum(lengths[i] for i in row) <= 256 for row in rows if row != [0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradients_equal_the_padded_ones(arch):
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(r=2, init_lora_weights=False))
    examples = _examples()
    padded, packed = pad_batch(examples, 0), pack_batch(examples, 32, 0)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples really share rows
    assert label_token_count(packed["labels"]) == label_token_count(padded["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    loss_padded = causal_lm_loss_sum(model, padded)
    grads_padded = torch.autograd.grad(loss_padded, params)
    loss_packed = causal_lm_loss_sum(model, packed)
    grads_packed = torch.autograd.grad(loss_packed, params)
    assert abs(loss_packed.item() - loss_padded.item()) / label_token_count(padded["labels"]) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_padded, grads_packed)) <= 1e-5
