"""Sibling projections (q/k/v, gate/up) as one GEMM against the separate layers: loss, gradients, fallbacks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.lora import fused_siblings
from lorakit.lora.adapters import lora_layers
from lorakit.lora.fused_mlp import FusedSwiGLUPacked
from lorakit.lora.fused_siblings import fuse_projections, unfuse_projections
from lorakit.train.lean import use_fused_paths
from conftest import TINY_MODELS


def _loss_and_grads(model, input_ids, seed: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the same dropout masks on every path: they are drawn in the same order
    loss = model(input_ids=input_ids, labels=input_ids).loss
    return loss.detach(), torch.autograd.grad(loss, params)


def _counting(monkeypatch, cls) -> list:
    calls, original = [], cls.forward
    monkeypatch.setattr(cls, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    return calls


def _gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v carry biases, packed too
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_packed_projections_match_the_separate_layers(family, dropout, input_ids, monkeypatch):
    model = lorakit.inject(TINY_MODELS[family](), lorakit.LoraConfig(r=4, lora_dropout=dropout, init_lora_weights=False))
    model.train()
    for _, layer in lora_layers(model):  # with dropout: each layer's fused path, which draws masks the same way
        layer.fused = dropout > 0
    plain_loss, plain = _loss_and_grads(model, input_ids)
    applied = use_fused_paths(model, projections=True)
    assert applied["projection_groups"] == 2 * model.config.num_hidden_layers
    grouped, mlps = _counting(monkeypatch, fused_siblings.FusedSiblingLinear), _counting(monkeypatch, FusedSwiGLUPacked)
    loss, grads = _loss_and_grads(model, input_ids)
    assert len(grouped) == len(mlps) == model.config.num_hidden_layers  # q/k/v as one; gate/up inside the MLP
    assert abs(plain_loss - loss) <= 1e-5
    assert _gap(plain, grads) <= 1e-5


def test_packed_weights_are_views_of_one_buffer_and_release_gives_them_back():
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2))
    attention = model.model.layers[0].self_attn
    before = [getattr(attention, n).base_layer.weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj")]
    fuse_projections(model)
    group = attention.q_proj.sibling_group
    assert group is attention.v_proj.sibling_group and group.weight.shape[0] == sum(w.shape[0] for w in before)
    weights = [getattr(attention, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj")]
    assert all(w.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr() for w in weights)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))
    unfuse_projections(model)
    assert attention.q_proj.sibling_group is None
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, weights))


def test_group_falls_back_when_an_adapter_is_merged_or_disabled(input_ids):
    model = lorakit.inject(TINY_MODELS["qwen2"](), lorakit.LoraConfig(r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        with lorakit.disable_adapters(model):
            base = model(input_ids=input_ids).logits
        use_fused_paths(model, projections=True)
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-5)
        lorakit.merge_adapters(model)  # writes through the views into the packed buffer
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-4)
        lorakit.unmerge_adapters(model)
        with lorakit.disable_adapters(model):
            assert torch.allclose(model(input_ids=input_ids).logits, base, atol=1e-5)
    groups = {layer.sibling_group for _, layer in lora_layers(model)} - {None}
    assert groups and not any(group._held for group in groups)  # nothing left behind


def test_dora_adapters_run_their_own_path(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, use_dora=True, init_lora_weights=False))
    model.train()
    plain_loss, plain = _loss_and_grads(model, input_ids)
    use_fused_paths(model, projections=True)
    assert not model.model.layers[0].self_attn.q_proj.sibling_group.applies()
    loss, grads = _loss_and_grads(model, input_ids)
    assert abs(plain_loss - loss) <= 1e-5 and _gap(plain, grads) <= 1e-5


def test_merged_model_saves_and_the_adapter_keeps_its_layout(tmp_path, input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "separate")
    use_fused_paths(model, projections=True)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    lorakit.save_adapter(model, tmp_path / "packed")
    separate, packed = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("separate", "packed"))
    assert {k: v.shape for k, v in separate.items()} == {k: v.shape for k, v in packed.items()}
    assert all(torch.equal(separate[k], packed[k]) for k in separate)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        merged = lorakit.merge_and_unload(model)
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")  # refuses weights that share storage
    assert (tmp_path / "merged" / "model.safetensors").is_file()
