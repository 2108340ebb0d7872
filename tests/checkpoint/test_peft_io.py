"""Adapters cross between lorakit and PEFT 0.21 in both directions with the same logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.checkpoint.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from lorakit.lora.adapters import lora_layers
from conftest import TINY_MODELS, logits_of, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

TOL = 1e-5

# (tiny model, lorakit/PEFT config fields): Linear targets, GPT-2 Conv1D, a saved head, rsLoRA, a rank_pattern.
CASES = {
    "llama-linear": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2-defaults": ("qwen2", dict(r=4, lora_alpha=16, target_modules=lorakit.inject.__globals__["LLAMA_TARGETS"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    "bert-head": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "llama-rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj"])),
    "llama-rank-pattern": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}),
    ),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "bert-bias": ("bert", dict(r=2, lora_alpha=4, target_modules=["query"], bias="lora_only", modules_to_save=["classifier"])),
}


def _train_a_little(model, ids: torch.Tensor, steps: int = 3) -> None:
    """A few real optimizer steps, so the saved adapter is a trained one (non-zero B)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        out = model(input_ids=ids)
        loss = out.logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("case", CASES)
def test_lorakit_adapter_loads_in_peft_with_same_logits(case, tmp_path, input_ids):
    arch, fields = CASES[case]
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(**fields))
    _train_a_little(model, input_ids)
    expected = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path).eval()
    got = logits_of(peft_model, input_ids)
    assert (expected - logits_of(TINY_MODELS[arch](), input_ids)).abs().max() > 1e-3  # it did train
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit_with_same_logits(case, tmp_path, input_ids):
    arch, fields = CASES[case]
    peft_model = get_peft_model(TINY_MODELS[arch](), PeftLoraConfig(**fields, init_lora_weights=False)).eval()
    with torch.no_grad():  # perturb everything trainable, heads and biases included
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = logits_of(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path)

    model = TINY_MODELS[arch]()
    lorakit.load_adapter(model, tmp_path)
    assert (logits_of(model, input_ids) - expected).abs().max().item() <= TOL


def test_saved_files_use_peft_names_and_fields(tmp_path):
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight" in keys
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] == 2 and config["target_modules"] == ["c_attn"]


def test_pickled_adapter_is_refused_unless_trusted(tmp_path):
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(source)
    lorakit.save_adapter(source, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")

    with pytest.raises(AdapterError, match="refusing a pickled adapter"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path, trust_pickle=True)
    ids = torch.arange(3, 13)[None]
    assert torch.allclose(logits_of(model, ids), logits_of(source, ids), atol=TOL)


def test_adapter_for_another_base_names_the_first_mismatch(tmp_path):
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(source)
    lorakit.save_adapter(source, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(2, 48)  # as if trained on a wider model
    save_file(tensors, tmp_path / WEIGHTS_NAME)

    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"has shape \(2, 48\) but the model needs \(2, 32\)"):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.lora.adapters.lora_layers(model) or not model.lora_configs  # nothing half-loaded

    with pytest.raises(AdapterError, match="does not fit this GPT2LMHeadModel"):
        lorakit.load_adapter(tiny_gpt2(), tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(source, tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"is truncated \(\d+ bytes, its header needs \d+\); expected a complete"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_classifier_without_saved_head_is_refused(tmp_path):
    model = lorakit.inject(tiny_bert_classifier(), lorakit.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(AdapterError, match="classifier head is not saved"):
        lorakit.save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()


def test_untrained_adapter_is_warned_about(tmp_path, caplog):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    assert "still zero" in caplog.text


def test_pissa_adapter_saves_as_plain_lora_for_the_original_base(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    _train_a_little(model, input_ids)
    expected = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["r"] == 8
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_checkpoint_of_an_adapter_that_moved_part_of_w_restores_into_it(init, tmp_path, input_ids):
    """Saved against the original W (rank 2r), restored into the live rank-r adapter (keep-best, resume)."""
    from lorakit.checkpoint.peft_io import restore_adapter_weights

    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    model = lorakit.inject(tiny_llama(), config)
    perturb(model, std=0.05)
    saved = logits_of(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    assert load_file(str(tmp_path / WEIGHTS_NAME))["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    perturb(model, std=0.05, seed=1)
    restore_adapter_weights(model, "default", tmp_path)
    assert (logits_of(model, input_ids) - saved).abs().max().item() <= TOL

    other = lorakit.inject(tiny_llama(), config)
    with torch.no_grad():  # another start than the one the file was saved from
        for _, layer in lora_layers(other):
            layer.adapters["default"].A0.mul_(2)
    with pytest.raises(AdapterError, match="holds another PiSSA/OLoRA start than this adapter's"):
        restore_adapter_weights(other, "default", tmp_path)


def _saved(tmp_path, **config):
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **config))
    perturb(source)
    lorakit.save_adapter(source, tmp_path)
    return load_file(tmp_path / WEIGHTS_NAME)


def _nothing_of(model, name: str = "default") -> bool:
    return all(name not in layer.adapters for _, layer in lora_layers(model)) and name not in getattr(
        model, "lora_configs", {})


def test_an_r_no_module_uses_loads_as_in_peft(tmp_path):
    _saved(tmp_path, rank_pattern={"q_proj": 2, "v_proj": 2})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "r": 8}))  # every module takes its rank_pattern's 2
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    assert {layer.adapters["default"].A.shape[0] for _, layer in lora_layers(model)} == {2}


def test_non_finite_weights_are_refused_and_nothing_is_left(tmp_path):
    tensors = _saved(tmp_path)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = tiny_llama()
    with pytest.raises(AdapterError, match=rf"{key} holds NaN or infinite values; expected finite weights"):
        lorakit.load_adapter(model, tmp_path)
    assert _nothing_of(model)


def test_finite_factors_under_a_scaling_beyond_float32_are_refused(tmp_path):
    """lora_alpha 1e38 on finite factors used to load, and a server then answered NaN text (empty or random)."""
    tensors = _saved(tmp_path)
    for key in tensors:
        if "lora_B" in key:
            tensors[key].fill_(0.5)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)  # as saved: loads
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 1e38}))
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"adapter_config.json: lora_alpha / r = .* beyond float32's range"):
        lorakit.load_adapter(model, tmp_path)
    assert _nothing_of(model)


def test_a_rank_the_weights_do_not_hold_is_refused_before_anything_is_made(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "r": 10**12}))  # would allocate petabytes
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"asks for rank 1000000000000 on .*q_proj, but its weights hold rank 2"):
        lorakit.load_adapter(model, tmp_path)
    assert _nothing_of(model)


@pytest.mark.parametrize(("change", "message"), [
    ([1, 2, 3], r"holds a JSON list; expected an object of LoRA settings"),
    ({"target_modules": "("}, r"lora.target_modules: given '\(', not a regex"),
    ({"target_modules": 5}, r"lora.target_modules: given 5, expected a list of module names"),
    ({"rank_pattern": [1]}, r"lora.rank_pattern: given \[1\], expected a mapping"),
])
def test_a_config_of_the_wrong_shape_is_one_clear_error(tmp_path, change, message):
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **change} if isinstance(change, dict) else change))
    with pytest.raises(AdapterError, match=message):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_an_inject_that_fails_half_way_leaves_nothing_and_the_name_free(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "modules_to_save": ["no_such_head"]}))
    model = tiny_llama()
    with pytest.raises(AdapterError, match="does not fit"):
        lorakit.load_adapter(model, tmp_path, "a")
    assert _nothing_of(model, "a")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    lorakit.load_adapter(model, tmp_path, "a")  # the same name loads now
    assert not _nothing_of(model, "a")


def test_lora_only_refuses_a_weight_of_the_base_and_leaves_the_base_as_it_was(tmp_path):
    tensors = _saved(tmp_path)
    model = tiny_llama()
    norm = model.model.norm.weight.detach().clone()
    tensors["base_model.model.model.norm.weight"] = torch.zeros_like(norm)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match=r"base_model.model.model.norm.weight is not a LoRA weight"):
        lorakit.load_adapter(model, tmp_path, lora_only=True)
    assert torch.equal(model.model.norm.weight, norm) and _nothing_of(model)
    lorakit.load_adapter(model, tmp_path)  # a library load may write it (a bias or a saved module trained with it)
    assert not model.model.norm.weight.any()


def test_a_file_given_as_the_adapter_folder_is_named_as_one(tmp_path):
    from lorakit.checkpoint.peft_io import read_adapter_config

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(AdapterError, match=rf"^{text}: is a file; expected an adapter folder holding {CONFIG_NAME}"):
        read_adapter_config(text)


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", float("nan"), "lora.lora_alpha: given nan, expected a positive number"),
    ("lora_alpha", True, "lora.lora_alpha: given True, expected a positive number"),
    ("use_rslora", "false", "lora.use_rslora: given 'false', expected true or false"),  # a truthy string
    ("alpha_pattern", {"q_proj": float("inf")}, "lora.alpha_pattern['q_proj']: given inf, expected a positive number"),
])
def test_a_config_value_that_would_scale_the_update_wrongly_is_refused(tmp_path, field, value, message):
    from lorakit.checkpoint.peft_io import read_adapter_config

    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, field: value}))
    with pytest.raises(AdapterError) as refused:
        read_adapter_config(tmp_path)
    assert str(refused.value) == f"{tmp_path / CONFIG_NAME}: {message}"


@pytest.mark.parametrize("card, message", [({"template": 123}, "template: given 123, expected a template name"),
                                           ({"task": ["a"]}, "task: given ['a'], expected a task name"),
                                           ({"quantization": "nf4"}, "quantization: given 'nf4', expected an object")])
def test_a_run_card_field_of_the_wrong_type_is_named(tmp_path, card, message):
    from lorakit.checkpoint.run_card import RUN_CARD, read_run_card

    (tmp_path / RUN_CARD).write_text(json.dumps(card))
    with pytest.raises(AdapterError, match=rf"^{tmp_path / RUN_CARD}: {re.escape(message)}"):
        read_run_card(tmp_path)
    (tmp_path / RUN_CARD).write_text(json.dumps({"template": "seed", "task": None, "labels": ["a", "b"]}))
    assert read_run_card(tmp_path)["labels"] == ["a", "b"]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda"])
def test_factors_peft_saved_against_a_reduced_base_are_refused(tmp_path, init):
    """PEFT saves PiSSA/OLoRA factors relative to W - B0 A0 unless converted; loaded on W they were silently wrong."""
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": init}))
    model = tiny_llama()
    with pytest.raises(AdapterError, match=rf"init_lora_weights is '{init}': these factors were saved relative"):
        lorakit.load_adapter(model, tmp_path)
    assert _nothing_of(model)


@pytest.mark.parametrize("field", ["exclude_modules", "alora_invocation_tokens"])
def test_peft_options_lorakit_would_ignore_are_refused(tmp_path, field):
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, field: ["x"] if field == "exclude_modules" else [1]}))
    with pytest.raises(AdapterError, match=f"'{field}' is set"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_an_adapter_loaded_into_a_model_in_eval_mode_has_its_dropout_off(tmp_path):
    """The new layers used to be built in training mode: two identical calls then differed by the dropout."""
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    perturb(source, std=0.3)
    lorakit.save_adapter(source, tmp_path)
    model = tiny_llama().eval()
    lorakit.load_adapter(model, tmp_path)
    assert not any(module.training for module in model.modules())
    ids = torch.arange(12)[None]
    assert torch.equal(model(ids).logits, model(ids).logits)
