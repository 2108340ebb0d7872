"""Several adapters on one base: rounding one adapter's factors to a narrower type's values."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import perturb, tiny_llama
from lorakit.lora.adapters import lora_layers, round_adapter
from lorakit.lora.int8_factors import int8_rows


def two_adapters():
    """A tiny Llama with adapters "a" and "b" on q_proj and down_proj, perturbed, and each adapter parameter's values
    by (layer, name)."""
    model = tiny_llama()
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), name)
        perturb(model, name, std=0.3, seed=seed)
    return model, {(n, k): p.clone() for n, layer in lora_layers(model) for k, p in layer.adapters.named_parameters()}


def rounded(model, before: dict) -> list[tuple]:
    """(name, value, value before) of adapter "a"'s parameters; every parameter still fp32, "b"'s untouched."""
    found = []
    for n, layer in lora_layers(model):
        for k, p in layer.adapters.named_parameters():
            assert p.dtype == torch.float32
            if k.startswith("a."):
                found.append((k, p, before[(n, k)]))
            else:
                assert torch.equal(p, before[(n, k)])  # the other adapter untouched
    return found


def test_round_adapter_rounds_only_that_adapters_factors_to_bf16_values():
    model, before = two_adapters()
    round_adapter(model, "a", torch.bfloat16)
    for _, p, was in rounded(model, before):
        assert torch.equal(p, was.bfloat16().float()) and not torch.equal(p, was)
    with pytest.raises(KeyError):
        round_adapter(model, "missing", torch.bfloat16)


def test_round_adapter_rounds_each_rank_of_that_adapter_to_int8_values_times_a_power_of_two():
    model, before = two_adapters()
    round_adapter(model, "a", torch.int8)
    for k, p, was in rounded(model, before):
        ranks = p if k == "a.A" else p.t()  # a row of A, a column of B
        q, c = int8_rows(ranks, torch.ones(len(ranks)))
        assert torch.equal(torch.log2(c), torch.log2(c).round())  # powers of two
        # each rank to its nearest value at that scale, its largest within the int8 range at the smallest one
        step = c[:, None] if k == "a.A" else c[None, :]
        assert bool(((p - was).abs() <= step / 2).all()) and not torch.equal(p, was)
        assert bool((q.abs().amax(dim=1) > 63).all())
    again = {k: p.clone() for k, p in model.named_parameters()}
    round_adapter(model, "a", torch.int8)  # int8 values stay as they are
    assert all(torch.equal(p, again[k]) for k, p in model.named_parameters())
