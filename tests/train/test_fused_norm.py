"""The fused RMSNorm against transformers' own, alone and inside a whole model's gradients."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.train.fused_norm import FrozenRMSNorm, fuse_rms_norms, unfuse_rms_norms
from lorakit.train.lean import use_fused_paths
from conftest import TINY_MODELS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_norm_matches_the_model_norm_forward_and_backward(arch):
    norm = TINY_MODELS[arch]().model.norm
    norm.weight.requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = (torch.randn(3, 7, norm.weight.shape[0], generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (expected_dx,) = torch.autograd.grad(expected := norm(x), x, g)
    (dx,) = torch.autograd.grad(y := FrozenRMSNorm.apply(x, norm.weight, norm.variance_epsilon), x, g)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-6)


def test_whole_model_gradients_with_every_fused_path_equal_the_plain_ones(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    plain_loss, plain = grads()
    assert use_fused_paths(model)["fused_norms"] == 2 * 2 + 1  # two per block, one final
    fused_loss, fused = grads()
    assert abs(fused_loss - plain_loss) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(plain, fused)) <= 1e-5


def test_trainable_norm_weights_fall_back_and_unfuse_restores(input_ids):
    model = TINY_MODELS["llama"]()
    fuse_rms_norms(model)
    model.model.norm.weight.requires_grad_(True)  # e.g. trained in full: its gradient must be formed
    model(input_ids=input_ids).logits.sum().backward()
    assert model.model.norm.weight.grad is not None and model.model.norm.weight.grad.abs().sum() > 0
    assert fuse_rms_norms(model) == 0  # already fused
    unfuse_rms_norms(model)
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_projections_after_a_fused_norm_save_its_recipe_not_its_output(input_ids):
    """q/k/v and the MLP keep the norm's input and 1/rms (kept by the norm anyway), not a copy of its output,
    and the gradients stay equal to the plain path's."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, target_modules=targets,
                                                                      init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    plain_loss = model(input_ids=input_ids, labels=input_ids).loss
    plain = torch.autograd.grad(plain_loss, params)
    paths = use_fused_paths(model)
    assert paths["fused_mlps"] == 2 and paths["projection_groups"] == 4
    norm_outputs, saved = [], []
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.register_forward_hook(lambda _m, _i, out: norm_outputs.append(out))  # kept: no address reused
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        fused_loss = model(input_ids=input_ids, labels=input_ids).loss
    assert len(norm_outputs) == 4
    assert not {out.untyped_storage().data_ptr() for out in norm_outputs} & set(saved)
    fused = torch.autograd.grad(fused_loss, params)
    assert abs(fused_loss - plain_loss) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(plain, fused)) <= 1e-5


def test_a_norm_output_changed_in_place_is_saved_itself():
    from lorakit.train.fused_norm import restored_input, saved_input

    weight = torch.rand(8) + 0.5
    out = FrozenRMSNorm.apply(torch.randn(3, 8), weight, 1e-6)
    rows, inv, _ = saved_input(out)
    assert inv is not None and torch.equal(restored_input((rows, inv, weight), out.shape), out)
    out.mul_(2)  # e.g. a scale applied in place between the norm and the projection
    kept, inv, _ = saved_input(out)
    assert inv is None and kept is out
