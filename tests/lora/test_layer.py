"""The LoRA layer's math: zero start, scaling, dropout, merge/unmerge, disable, PiSSA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.lora.layer import LoraLayer
from conftest import TINY_MODELS, logits_of, perturb


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 7)
    if kind == "conv1d":
        return Conv1D(7, 12)  # nf=out, nx=in; weight stored (in, out)
    return nn.Embedding(12, 7)


def _input(kind: str) -> torch.Tensor:
    if kind == "embedding":
        return torch.randint(0, 12, (3, 5))
    return torch.randn(3, 5, 12)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_fresh_adapter_changes_nothing_then_merge_and_unmerge_are_exact(kind):
    base = _layer(kind)
    x = _input(kind)
    expected = base(x)
    original_weight = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=6)
    assert torch.equal(layer(x), expected)

    with torch.no_grad():
        layer.adapters["a"].A.normal_()
        layer.adapters["a"].B.normal_()
    unmerged = layer(x)
    assert (unmerged - expected).abs().max() > 1e-2
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert (base.weight - original_weight).abs().max() <= 1e-6
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(use_rslora, expected):
    layer = LoraLayer(nn.Linear(8, 8))
    adapter = layer.add_adapter("a", r=4, alpha=16, use_rslora=use_rslora)
    assert adapter.scaling == pytest.approx(expected)
    with torch.no_grad():
        adapter.B.normal_()
    x = torch.randn(2, 8)
    delta = layer(x) - layer.base_layer(x)
    assert torch.allclose(delta, x @ (adapter.B @ adapter.A).T * expected, atol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    layer = LoraLayer(nn.Linear(16, 16))
    layer.add_adapter("a", r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.adapters["a"].B.normal_()
    x = torch.randn(64, 16)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # dropout is live in training
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))  # the base path never sees dropout
    layer.disabled = False
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_disable_adapters_runs_the_bare_base_even_when_merged(input_ids):
    model = TINY_MODELS["llama"]()
    base_logits = logits_of(model, input_ids)
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    perturb(model)
    adapted = logits_of(model, input_ids)
    lorakit.merge_adapters(model)
    with lorakit.disable_adapters(model):
        assert torch.allclose(logits_of(model, input_ids), base_logits, atol=1e-5)
    assert torch.allclose(logits_of(model, input_ids), adapted, atol=1e-5)


def test_gaussian_init_has_zero_b_and_small_a():
    layer = LoraLayer(nn.Linear(64, 64))
    adapter = layer.add_adapter("a", r=8, alpha=8, init="gaussian")
    assert not adapter.B.any()
    assert adapter.A.std().item() == pytest.approx(1 / 8, rel=0.2)


def test_pissa_keeps_the_output_and_moves_the_principal_part_into_the_adapter():
    base = nn.Linear(24, 16)
    x = torch.randn(4, 24)
    expected = base(x)
    weight = base.weight.detach().clone()
    layer = LoraLayer(base)
    adapter = layer.add_adapter("a", r=4, alpha=8, init="pissa")
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # The adapter holds the best rank-4 approximation of W: the residual's top singular value is W's fifth.
    singular = torch.linalg.svdvals(weight)
    assert torch.linalg.svdvals(base.weight.detach())[0] == pytest.approx(singular[4].item(), rel=1e-4)
    assert torch.linalg.matrix_rank(adapter.delta_weight().detach()) == 4


def test_wrapping_an_unsupported_layer_is_an_error():
    with pytest.raises(TypeError, match="not LayerNorm"):
        LoraLayer(nn.LayerNorm(4))
