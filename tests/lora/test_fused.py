"""The fused base+LoRA autograd function against plain autograd: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.lora.adapters import lora_layers
from lorakit.lora.layer import LoraLayer
from conftest import TINY_MODELS


def _grads(layer: LoraLayer, x: torch.Tensor, fused: bool):
    """Output and gradients of a dropout-free layer on one path."""
    layer.fused = fused
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    adapter = layer.adapters["a"]
    out = (y.detach(), x.grad, adapter.A.grad.clone(), adapter.B.grad.clone())
    adapter.A.grad = adapter.B.grad = None
    return out


@pytest.mark.parametrize("base", [nn.Linear(12, 7), Conv1D(7, 12)], ids=["linear", "conv1d"])
def test_fused_matches_plain_autograd(base):
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=6, init=False)
    assert layer.can_fuse()
    x = torch.randn(2, 5, 12)
    plain, fused = _grads(layer, x, False), _grads(layer, x, True)
    for a, b in zip(plain, fused):
        assert (a - b).abs().max().item() <= 1e-5


def test_fused_dropout_gradients_match_the_mask_it_drew():
    """With dropout on, the fused path must give the gradients of the very mask it sampled."""
    layer = LoraLayer(nn.Linear(16, 8))
    adapter = layer.add_adapter("a", r=4, alpha=4, dropout=0.5, init=False)
    layer.train()
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(3)
    keep = torch.rand_like(x) >= 0.5  # the same draw the function made
    A, B = adapter.A.detach().clone().requires_grad_(True), adapter.B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = layer.base_layer(x2) + ((x2 * keep / 0.5) @ A.T) @ B.T * adapter.scaling
    ref.sum().backward()
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(adapter.A.grad, A.grad, atol=1e-5) and torch.allclose(adapter.B.grad, B.grad, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_whole_model_gradients_fused_vs_plain(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fused: bool):
        for _, layer in lora_layers(model):
            layer.fused = fused
        loss = model(input_ids=input_ids, labels=input_ids).loss
        return torch.autograd.grad(loss, params)

    assert max((a - b).abs().max().item() for a, b in zip(grads(False), grads(True))) <= 1e-5


def test_bias_training_falls_back_to_the_plain_path():
    model = lorakit.inject(TINY_MODELS["gpt2"](), lorakit.LoraConfig(r=2, bias="lora_only"))
    assert not any(layer.can_fuse() for _, layer in lora_layers(model))


def test_autocast_falls_back_to_the_plain_path():
    layer = LoraLayer(nn.Linear(8, 4))
    layer.add_adapter("a", r=2, alpha=2, init=False)
    assert layer.can_fuse()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.can_fuse()  # the fused backward assumes one dtype throughout
