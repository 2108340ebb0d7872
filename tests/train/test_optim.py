"""Parameter groups: weight decay on matrices only, LoRA+ learning rate for B; 8-bit AdamW."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.config import TrainConfig
from lorakit.train.optim import build_optimizer
from conftest import TINY_MODELS, toy_model_folder


def test_loraplus_and_decay_groups():
    model = lorakit.inject(TINY_MODELS["bert"](), lorakit.LoraConfig(r=2, task_type="SEQ_CLS", bias="lora_only"))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16))
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in by_param
            continue
        group = by_param[id(param)]
        assert group["lr"] == (16e-3 if name.endswith(".B") else 1e-3), name
        assert group["weight_decay"] == (0.1 if param.dim() >= 2 else 0.0), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_steps_like_adamw_on_a_4bit_base(tmp_path, name):
    """Same betas, eps and groups as adamw; moments of tensors >= 4,096 elements stored in 8 bits."""
    from lorakit.config import QuantizationConfig
    from lorakit.models import load_causal_lm
    from lorakit.quant import quantize_model

    folder = toy_model_folder(tmp_path / "toy")
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    moved = {}
    for optimizer_name in ("adamw", name):
        torch.manual_seed(0)
        model = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4))
        lorakit.inject(model, lorakit.LoraConfig(r=32, init_lora_weights=False))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01, optimizer=optimizer_name))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        moved[optimizer_name] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments, not only 32-bit
    for param_name, step in moved[name].items():
        reference = moved["adamw"][param_name]
        assert step.abs().max() > 5e-4, param_name  # Adam's first step is about lr * sign(grad)
        assert (step - reference).abs().max() <= 1e-4, param_name  # within 10% of lr
