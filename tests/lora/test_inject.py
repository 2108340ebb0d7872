"""Injection by name, defaults per architecture, freezing, bias modes, saved modules, the report."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit
from lorakit.lora.adapters import lora_layers
from conftest import TINY_MODELS, logits_of

PARITY = {
    "llama": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], bias="lora_only"),
    "bert": dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"], bias="all"),
}


@pytest.mark.parametrize("arch", TINY_MODELS)
def test_fresh_model_gives_the_base_logits(arch, input_ids):
    model = TINY_MODELS[arch]()
    expected = logits_of(model, input_ids)
    lorakit.inject(model, lorakit.LoraConfig(task_type="SEQ_CLS" if arch == "bert" else None))
    assert torch.equal(logits_of(model, input_ids), expected)


@pytest.mark.parametrize("arch", PARITY)
def test_trainable_counts_equal_peft(arch):
    fields = PARITY[arch]
    ours = lorakit.trainable_counts(lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(**fields)))
    peft_model = get_peft_model(TINY_MODELS[arch](), PeftLoraConfig(**fields))
    theirs = peft_model.get_nb_trainable_parameters()
    assert ours == theirs
    report = lorakit.trainable_report(TINY_MODELS[arch]().requires_grad_(False))
    assert report.startswith("trainable params: 0 || all params: ")


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj"}),
        ("bert", {"query", "key", "value", "dense"}),
    ],
)
def test_default_targets_per_architecture(arch, expected):
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(task_type="SEQ_CLS" if arch == "bert" else None))
    assert {name.split(".")[-1] for name, _ in lora_layers(model)} == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n or ".copies." in n for n in trainable)


def test_unmatched_targets_name_the_closest_modules():
    with pytest.raises(lorakit.ConfigError, match=r"matched no module of LlamaForCausalLM; closest names it has: .*q_proj"):
        lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(target_modules=["q_prj"]))


def test_targeting_a_layer_lora_cannot_wrap_is_an_error():
    with pytest.raises(lorakit.ConfigError, match="is a LlamaRMSNorm"):
        lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(r=0), r"lora.r: given 0, expected a positive integer"),
        (dict(r=-2), r"lora.r: given -2"),
        (dict(lora_dropout=1.0), r"lora.lora_dropout: given 1.0, expected a number in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora.lora_dropout: given -0.1"),
        (dict(bias="some"), r"lora.bias: given 'some', expected one of none, all, lora_only"),
        (dict(r=0, bias="x"), r"lora.r: .*; lora.bias: "),  # all problems at once
    ],
)
def test_invalid_config_names_the_field(fields, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.LoraConfig(**fields)


def test_regex_targets_and_rank_pattern():
    config = lorakit.LoraConfig(r=4, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj", rank_pattern={"v_proj": 2})
    model = lorakit.inject(TINY_MODELS["llama"](), config)
    ranks = {name: layer.adapters["default"].r for name, layer in lora_layers(model)}
    assert ranks == {"model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 2}


def test_seq_cls_task_trains_and_saves_the_head():
    model = lorakit.inject(TINY_MODELS["bert"](), lorakit.LoraConfig(task_type="SEQ_CLS"))
    assert model.lora_configs["default"].modules_to_save == ["classifier"]
    head = model.classifier
    assert all(p.requires_grad for p in head.copies["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())


def test_pattern_keys_keep_their_order_through_a_save(tmp_path):
    """The first matching key wins, in lorakit and PEFT alike: a saved adapter keeps the keys in their order (sorted,
    '.*down_proj' would come first and give layer 1's down_proj alpha 4 after a reload)."""
    pattern = {"layers.1.mlp.down_proj": 32, ".*down_proj": 4}
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], alpha_pattern=pattern)
    model = lorakit.inject(TINY_MODELS["llama"](), config)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.adapters["default"].B, std=0.05)
    ids = torch.arange(12).view(1, 12)
    lorakit.save_adapter(model, tmp_path)
    again = TINY_MODELS["llama"]()
    lorakit.load_adapter(again, tmp_path)
    scales = {name: layer.adapters["default"].scaling for name, layer in lora_layers(again)}
    assert scales["model.layers.1.mlp.down_proj"] == 8.0 and scales["model.layers.0.mlp.down_proj"] == 1.0
    assert (logits_of(again, ids) - logits_of(model, ids)).abs().max() <= 1e-6
