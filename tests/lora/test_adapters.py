"""Several adapters on one base: rounding one adapter's factors to a narrower type's values."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import perturb, tiny_llama
from lorakit.lora.adapters import lora_layers, round_adapter


def test_round_adapter_rounds_only_that_adapters_factors_to_bf16_values():
    model = tiny_llama()
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), name)
        perturb(model, name, std=0.3, seed=seed)
    before = {(n, k): p.clone() for n, layer in lora_layers(model) for k, p in layer.adapters.named_parameters()}
    round_adapter(model, "a", torch.bfloat16)
    for n, layer in lora_layers(model):
        for k, p in layer.adapters.named_parameters():
            was = before[(n, k)]
            assert p.dtype == torch.float32
            if k.startswith("a."):
                assert torch.equal(p, was.bfloat16().float()) and not torch.equal(p, was)
            else:
                assert torch.equal(p, was)  # the other adapter untouched
    with pytest.raises(KeyError):
        round_adapter(model, "missing", torch.bfloat16)
