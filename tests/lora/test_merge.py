"""Merging, unloading to a plain model, and several adapters on one base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import lorakit
from lorakit.lora.adapters import lora_layers
from conftest import TINY_MODELS, logits_of, perturb, tiny_llama


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_unmerge_restores_weights_and_keeps_logits(arch, input_ids):
    model = TINY_MODELS[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, task_type="SEQ_CLS" if arch == "bert" else None))
    perturb(model)
    unmerged = logits_of(model, input_ids)
    lorakit.merge_adapters(model)
    assert (logits_of(model, input_ids) - unmerged).abs().max() <= 1e-5
    lorakit.unmerge_adapters(model)
    for name, layer in lora_layers(model):
        weight = layer.base_layer.weight
        assert (weight - before[f"{name}.weight"]).abs().max() <= 1e-6


@pytest.mark.parametrize("arch, auto", [("llama", AutoModelForCausalLM), ("gpt2", AutoModelForCausalLM), ("bert", AutoModelForSequenceClassification)])
def test_merge_and_unload_saves_a_plain_model(arch, auto, input_ids, tmp_path):
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(r=4, task_type="SEQ_CLS" if arch == "bert" else None))
    perturb(model)
    expected = logits_of(model, input_ids)
    plain = lorakit.merge_and_unload(model)
    assert not any("lora" in type(m).__name__.lower() or "Saved" in type(m).__name__ for m in plain.modules())
    assert (logits_of(plain, input_ids) - expected).abs().max() <= 1e-5
    plain.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert (logits_of(reloaded, input_ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_merge_into_tied_embeddings_unties_them_and_keeps_the_outputs(targets, input_ids, tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=targets))  # tiny_llama ties
    perturb(model, std=0.3)
    adapted = logits_of(model, input_ids)
    lorakit.merge_adapters(model)
    assert (logits_of(model, input_ids) - adapted).abs().max() <= 1e-5
    lorakit.unmerge_adapters(model)
    merged = lorakit.merge_and_unload(model)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.tie_word_embeddings
    assert (logits_of(loaded, input_ids) - adapted).abs().max() <= 1e-5


def test_weighted_adapter_is_the_exact_weighted_sum_of_deltas(input_ids):
    model = TINY_MODELS["llama"]()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), "b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "mix")
    got = logits_of(model, input_ids)

    reference = TINY_MODELS["llama"]()
    state = dict(base_state)
    for name, layer in lora_layers(model):
        delta = 0.7 * layer.adapters["a"].delta_weight()
        if "b" in layer.adapters:
            delta = delta + 0.3 * layer.adapters["b"].delta_weight()
        state[f"{name}.weight"] = base_state[f"{name}.weight"] + delta.detach()
    reference.load_state_dict(state)
    assert (got - logits_of(reference, input_ids)).abs().max() <= 1e-5


def test_switch_and_delete_adapters(input_ids):
    model = TINY_MODELS["llama"]()
    base = logits_of(model, input_ids)
    lorakit.inject(model, lorakit.LoraConfig(r=2), "a")
    perturb(model, "a", seed=1)
    only_a = logits_of(model, input_ids)
    lorakit.inject(model, lorakit.LoraConfig(r=2), "b")
    perturb(model, "b", seed=2)
    only_b = logits_of(model, input_ids)
    assert (only_a - only_b).abs().max() > 1e-3
    lorakit.set_adapter(model, "a")
    assert torch.allclose(logits_of(model, input_ids), only_a, atol=1e-6)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}
    lorakit.delete_adapter(model, "a")
    assert set(model.lora_configs) == {"b"}
    assert torch.allclose(logits_of(model, input_ids), base, atol=1e-6)  # nothing active now
    lorakit.set_adapter(model, "b")
    assert torch.allclose(logits_of(model, input_ids), only_b, atol=1e-6)
    with pytest.raises(KeyError, match="no adapter 'a'"):
        lorakit.set_adapter(model, "a")
