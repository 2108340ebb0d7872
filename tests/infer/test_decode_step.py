"""decode_logits: the feature-major decode step of Llama-family models equals the model's own forward
(logits and cache), with plain, half-weight and LoRA projections and per-row adapters; other models and
settings go through the forward."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, perturb, tiny_gpt2, tiny_llama, tiny_qwen2
from lorakit.infer.decode_linears import use_decode_linears
from lorakit.infer.decode_step import decode_logits, lean_decodes
from lorakit.infer.half_weights import use_half_weights
from lorakit.infer.kv_cache import roomy_cache
from lorakit.lora.base import FEW_ROWS
from lorakit.lora.mixed import row_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prefilled(model, rows: int = 3, width: int = 6, seed: int = 0):
    """A left-padded batch prefilled into a fresh cache: (cache, mask, next positions, next tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    for b in range(rows):
        mask[b, : b % width] = 0  # row b has b pad tokens on its left
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = roomy_cache(model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache).logits
    return cache, mask, position[:, -1:] + 1, logits[:, -1].argmax(-1)


def decode_both(model, steps: int = 3, rows: int = 3):
    """`steps` decode steps through decode_logits and through the model's forward, from the same prefill and
    fed the same tokens; returns both runs' logits per step and their caches. Fails if the lean path was
    not taken."""
    (lean_cache, mask, position, tokens), (plain_cache, *_) = prefilled(model, rows), prefilled(model, rows)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    got, expected = [], []
    try:
        with torch.no_grad():
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                got.append(decode_logits(model, tokens, mask, position, lean_cache))
                assert not calls, "the decoder layers' forward ran"
                expected.append(model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=plain_cache
                ).logits[:, -1])
                calls.clear()
                position, tokens = position + 1, expected[-1].argmax(-1)
    finally:
        hook.remove()
    return got, expected, lean_cache, plain_cache


def assert_same(got, expected, lean_cache, plain_cache, atol=1e-5):
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    for a, b in zip(lean_cache.layers, plain_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=atol, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_the_lean_step_equals_the_forward(build):
    model = build()
    with torch.no_grad():
        assert lean_decodes(model, torch.zeros(3, dtype=torch.long), roomy_cache(model.config))
    assert_same(*decode_both(model))


def test_the_lean_step_equals_the_forward_through_frozen_and_half_weight_linears():
    assert_same(*decode_both(use_decode_linears(tiny_llama())))
    model = tiny_llama()
    assert use_half_weights(model, "bf16") == "bf16"  # as `lorakit serve` prepares its model
    assert_same(*decode_both(use_decode_linears(model)), atol=1e-4)


@pytest.mark.parametrize("strategy", ["gathered", "grouped", "stacked"])
def test_the_lean_step_equals_the_forward_with_per_row_adapters(strategy):
    model = tiny_llama()
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * seed, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    with row_adapters(model, ["a", None, "b", "a"], strategy):
        got, expected, lean_cache, plain_cache = decode_both(model, rows=4)
    assert_same(got, expected, lean_cache, plain_cache)
    with row_adapters(model, [None] * 4, strategy):
        base, _, _, _ = decode_both(model, steps=1, rows=4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters took part


def test_siblings_share_their_down_product_in_the_lean_step_as_in_the_forward():
    """q/k/v (and gate/up) read one x A^T together: the lean step runs as many batched products as the
    forward, not one per sibling."""
    from torch.profiler import profile

    model = tiny_llama()
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    counts = []
    with row_adapters(model, ["a", "b", "a"], "gathered"):
        cache, mask, position, tokens = prefilled(model)
        mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
        for lean in (True, False):
            step_cache = copy.deepcopy(cache)
            with torch.no_grad(), profile() as prof:
                if lean:
                    decode_logits(model, tokens, mask, position, step_cache)
                else:
                    model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                          past_key_values=step_cache)
            counts.append(sum(e.count for e in prof.key_averages() if e.key in ("aten::bmm", "aten::baddbmm")))
    assert counts[0] == counts[1] > 0


def test_other_models_and_settings_go_through_the_forward():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    tokens, cache = torch.zeros(3, dtype=torch.long), roomy_cache(llama.config)
    with torch.no_grad():
        assert not lean_decodes(gpt2, tokens, roomy_cache(gpt2.config))
        assert lean_decodes(llama, tokens, cache)
        assert not lean_decodes(llama, torch.zeros(FEW_ROWS + 1, dtype=torch.long), cache)
        llama.train()
        assert not lean_decodes(llama, tokens, cache)
    llama.eval()
    assert not lean_decodes(llama, tokens, cache)  # autograd on
