"""The fused SwiGLU+LoRA MLP against the module's own forward: outputs, gradients, fallbacks."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.lora.adapters import lora_layers
from lorakit.lora.fused_mlp import FusedSwiGLULora, fuse_swiglu_mlps, unfuse_swiglu_mlps
from conftest import TINY_MODELS


def _loss_and_grads(model, input_ids, seed: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the same dropout masks on both paths: they are drawn in the same order
    loss = model(input_ids=input_ids, labels=input_ids).loss
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_mlp_matches_the_plain_module(family, dropout, input_ids):
    model = lorakit.inject(TINY_MODELS[family](), lorakit.LoraConfig(r=4, lora_dropout=dropout, init_lora_weights=False))
    model.train()
    plain_loss, plain = _loss_and_grads(model, input_ids)
    assert fuse_swiglu_mlps(model) == model.config.num_hidden_layers
    calls = []
    original = FusedSwiGLULora.forward
    FusedSwiGLULora.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        fused_loss, fused = _loss_and_grads(model, input_ids)
    finally:
        FusedSwiGLULora.forward = staticmethod(original)
    assert len(calls) == model.config.num_hidden_layers  # the fused function really ran
    assert abs(plain_loss - fused_loss) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(plain, fused)) <= 1e-5


def test_mlp_falls_back_when_an_adapter_is_merged(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        fuse_swiglu_mlps(model)
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-5)
        for _, layer in lora_layers(model):
            layer.merge()
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-4)  # the plain forward, merged
        with lorakit.disable_adapters(model):
            base = model(input_ids=input_ids).logits
        assert not torch.allclose(base, expected, atol=1e-3)


def test_merge_and_unload_of_a_fused_model_runs_the_plain_mlp(input_ids):
    """After training (which fuses the MLPs) a merged, unloaded model has plain Linear projections."""
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        fuse_swiglu_mlps(model)
        lorakit.merge_and_unload(model)
        assert not lora_layers(model)
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-4)


def test_unfuse_restores_the_class_forward():
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2))
    fuse_swiglu_mlps(model)
    assert fuse_swiglu_mlps(model) == 0  # already fused: nothing to do
    unfuse_swiglu_mlps(model)
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_non_swiglu_models_are_left_alone():
    model = lorakit.inject(TINY_MODELS["gpt2"](), lorakit.LoraConfig(r=2))
    assert fuse_swiglu_mlps(model) == 0
