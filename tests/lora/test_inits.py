"""Initialisations by name: OLoRA's QR start equals PEFT 0.21's, and its adapters load on the original base."""

from __future__ import annotations

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorakit
from conftest import TINY_MODELS, logits_of, perturb
from lorakit.config import ConfigError, QuantizationConfig, RunConfig
from lorakit.lora.adapters import lora_layers

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "k_proj", "gate_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", list(TARGETS))
def test_olora_starts_as_peft_does(arch, use_dora, input_ids):
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="olora", use_dora=use_dora)
    peft_model = get_peft_model(TINY_MODELS[arch](), PeftLoraConfig(**fields))
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(**fields))
    for name, layer in lora_layers(model):
        theirs = peft_model.base_model.model.get_submodule(name)
        adapter = layer.adapters["default"]
        assert (adapter.A - theirs.lora_A["default"].weight).abs().max().item() <= TOL, name
        assert (adapter.B - theirs.lora_B["default"].weight).abs().max().item() <= TOL, name
        assert (layer.base_layer.weight - theirs.base_layer.weight).abs().max().item() <= TOL, name  # the residual
        if use_dora:
            magnitude = theirs.lora_magnitude_vector["default"].weight
            assert (adapter.magnitude - magnitude).abs().max().item() <= TOL, name
    assert (logits_of(model, input_ids) - logits_of(TINY_MODELS[arch](), input_ids)).abs().max() <= TOL


def test_a_trained_olora_adapter_loads_in_peft_on_the_original_base(tmp_path, input_ids):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="olora")
    model = lorakit.inject(TINY_MODELS["llama"](), config)
    perturb(model, std=0.05)
    expected = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path).eval()
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL


def test_olora_on_a_conv1d_factors_the_out_by_in_weight(input_ids):
    """GPT-2 stores Conv1D weights as (in, out); OLoRA factors W as (out, in), so the output is unchanged at start."""
    model = lorakit.inject(TINY_MODELS["gpt2"](), lorakit.LoraConfig(r=4, init_lora_weights="olora"))
    layer = lora_layers(model)[0][1]
    assert layer.adapters["default"].B.shape == (layer.out_features, 4)
    assert (logits_of(model, input_ids) - logits_of(TINY_MODELS["gpt2"](), input_ids)).abs().max() <= TOL


def test_init_names_come_from_the_registry_and_moves_need_a_float_base():
    with pytest.raises(ConfigError, match="lora.init_lora_weights: given 'qr', expected true, false or one of .*'olora'"):
        lorakit.LoraConfig(init_lora_weights="qr")
    with pytest.raises(ConfigError, match="'olora' moves part of W into the adapter, which needs a float base"):
        RunConfig(lora=lorakit.LoraConfig(init_lora_weights="olora"), quantization=QuantizationConfig(bits=4))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_embedding_under_a_base_moving_init_starts_as_peft_does_and_saves(init, tmp_path, input_ids):
    """PEFT gives an embedding the default start under PiSSA/OLoRA and leaves its weight; saving such an adapter
    (its factors under lora_embedding_A/B) once failed."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init)
    base = TINY_MODELS["qwen2"]()
    model = lorakit.inject(TINY_MODELS["qwen2"](), lorakit.LoraConfig(**fields))
    embed = model.get_submodule("model.embed_tokens")
    assert not embed.adapters["default"].A.any() and embed.base_layer.weight.equal(base.model.embed_tokens.weight)
    assert (logits_of(model, input_ids) - logits_of(base, input_ids)).abs().max() <= TOL
    perturb(model, std=0.05)
    expected = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(TINY_MODELS["qwen2"](), tmp_path).eval()
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_moving_init_on_a_tied_head_leaves_the_embeddings_as_they_were(init, tmp_path, input_ids):
    base = TINY_MODELS["llama"]()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, target_modules=["lm_head", "q_proj"],
                                                                      init_lora_weights=init))
    assert model.model.embed_tokens.weight.equal(base.model.embed_tokens.weight)
    assert (logits_of(model, input_ids) - logits_of(base, input_ids)).abs().max() <= TOL  # PEFT: off by 0.29
    perturb(model, std=0.05)
    expected = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path).eval()  # on the original, tied base
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL
