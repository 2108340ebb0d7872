"""quantize_model on tiny models: what is quantised, what stays fp32, LoRA on top, checkpointing, merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.config import QuantizationConfig
from lorakit.lora.adapters import lora_layers
from lorakit.lora.merge import merge_and_unload
from lorakit.models import load_causal_lm, stored_dtype
from lorakit.quant import dequantize_model, is_quantized, quantize_model, weight_bytes_report
from conftest import TINY_MODELS, TOY_TARGETS, assert_same_model, bnb_load, logits_of, perturb, toy_model_folder

NF4 = QuantizationConfig(bits=4)


def test_linear_layers_are_quantised_and_the_rest_stays_fp32():
    model = quantize_model(TINY_MODELS["llama"](), NF4)
    quantised = {n for n, m in model.named_modules() if is_quantized(m)}
    assert len(quantised) == 2 * 7 and all(n.endswith("_proj") for n in quantised)
    assert (
        not is_quantized(model.lm_head) and model.lm_head.weight is model.model.embed_tokens.weight
    )  # tied, fp32
    for name, param in model.named_parameters():
        if not any(name.startswith(q + ".") for q in quantised):
            assert param.dtype == torch.float32, name
    assert model.is_loaded_in_4bit


def test_classifier_head_stays_full_precision():
    model = quantize_model(TINY_MODELS["bert"](), QuantizationConfig(bits=8))
    assert not is_quantized(model.classifier) and is_quantized(
        model.bert.encoder.layer[0].attention.self.query
    )


def test_lora_wraps_a_quantised_base_without_the_fused_path(input_ids):
    model = quantize_model(TINY_MODELS["llama"](), NF4)
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    perturb(model)
    layers = lora_layers(model)
    assert all(is_quantized(layer.base_layer) and not layer.can_fuse() for _, layer in layers)
    assert all(layer.adapters["default"].A.dtype == torch.float32 for _, layer in layers)
    with lorakit.disable_adapters(model):
        base = logits_of(model, input_ids)
    assert (logits_of(model, input_ids) - base).abs().max() > 1e-3  # the adapter acts on the 4-bit base


@pytest.mark.parametrize("bits", [4, 8])
def test_quantising_a_loaded_folder_matches_bitsandbytes_config_at_load(tmp_path, input_ids, bits):
    folder = toy_model_folder(tmp_path / "toy")
    ours = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=bits))
    theirs = bnb_load(folder, bits)
    packed = {n: m.weight for n, m in ours.named_modules() if is_quantized(m)}
    assert len(packed) == 14 and set(packed) == {n for n, m in theirs.named_modules() if is_quantized(m)}
    for name, weight in packed.items():
        assert torch.equal(weight.data, theirs.get_submodule(name).weight.data), name
    ids = input_ids % ours.config.vocab_size
    assert torch.equal(logits_of(ours, ids), logits_of(theirs, ids))


def _adapter_grads(model, ids, checkpointing: bool) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8])
def test_gradient_checkpointing_gives_the_same_gradients(bits, input_ids):
    model = quantize_model(TINY_MODELS["llama"](), QuantizationConfig(bits=bits))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS[:-1]))
    perturb(model)
    plain = _adapter_grads(model, input_ids, checkpointing=False)
    checkpointed = _adapter_grads(model, input_ids, checkpointing=True)
    assert model.is_gradient_checkpointing
    assert len(plain) == 2 * 2 * 7 and all(g.abs().sum() > 0 for g in plain.values())
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) <= 1e-5


def test_merge_refuses_a_quantised_base_and_merge_and_unload_dequantises(input_ids):
    model = quantize_model(TINY_MODELS["llama"](), NF4)
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    perturb(model)
    with pytest.raises(TypeError, match="cannot merge into a quantised Linear4bit"):
        lorakit.merge_adapters(model)
    adapter_on_4bit = logits_of(model, input_ids)
    merged = merge_and_unload(model)
    assert not any(is_quantized(m) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert (logits_of(merged, input_ids) - adapter_on_4bit).abs().max() <= 1e-4


def test_dequantize_model_keeps_outputs_and_counts_bytes(input_ids):
    model = quantize_model(TINY_MODELS["qwen2"](), NF4)
    report = weight_bytes_report(model)
    assert report.quantized_layers == 14 and report.linear_ratio < report.model_ratio < 1
    before = logits_of(model, input_ids)
    dequantize_model(model)
    assert weight_bytes_report(model).quantized_layers == 0 and not hasattr(model, "is_loaded_in_4bit")
    assert (logits_of(model, input_ids) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_checkpoint_loaded_in_its_type_quantises_to_the_fp32_loads_model(tmp_path, input_ids, stored):
    """QLoRA loads a checkpoint stored in a half type in that type (never whole in fp32): each linear
    is quantised from its fp32 copy and the rest goes to fp32, so the model is the fp32 load's, to the bit."""
    folder = toy_model_folder(tmp_path / "model")
    load_causal_lm(folder).to(stored).save_pretrained(folder)
    assert stored_dtype(folder) == stored
    wide = quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), NF4)
    narrow = quantize_model(load_causal_lm(folder, stored_dtype(folder)), NF4)
    assert narrow.config.dtype == torch.float32
    assert_same_model(narrow, wide, input_ids)


def test_an_fp32_checkpoint_and_a_folder_without_a_type_load_in_fp32(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    assert stored_dtype(folder) == torch.float32
    assert stored_dtype(tmp_path) == torch.float32  # no config.json: loading will say what is wrong
    (tmp_path / "config.json").write_text("{not json")
    assert stored_dtype(tmp_path) == torch.float32
