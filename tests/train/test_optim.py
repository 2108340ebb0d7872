"""Parameter groups: weight decay on matrices only, LoRA+ learning rate for B."""

from __future__ import annotations

import lorakit
from lorakit.config import TrainConfig
from lorakit.train.optim import build_optimizer
from conftest import TINY_MODELS


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
