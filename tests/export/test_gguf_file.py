"""The GGUF file itself, read back with gguf's reader and with lorakit's GGUF loading (no llama.cpp here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from export_models import ARCHS, styled_tokenizer, tiny_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.export import ExportConfig, ExportError, export
from lorakit.export.arch.llama import interleave_rotary_rows
from lorakit.models import load_causal_lm, load_tokenizer


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_interleave_rotary_rows_pairs_each_heads_halves():
    rows = torch.arange(8.0).reshape(8, 1)  # 2 heads of 4 rows: halves (0,1 | 2,3), (4,5 | 6,7)
    assert interleave_rotary_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_tensors_names_types_and_values(tmp_path, arch, outtype):
    folder = tiny_folder(tmp_path / "m", arch)
    out = tmp_path / "m.gguf"
    export(ExportConfig(model=str(folder), outtype=outtype, output=str(out)))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    for name, t in tensors.items():
        if t.data.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        else:
            assert t.tensor_type.name == outtype.upper(), name
    embed_key = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    embed = gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type)
    tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 1e-2}[outtype]
    np.testing.assert_allclose(embed, state[embed_key].numpy(), atol=tolerance, rtol=0)
    if arch == "llama":  # q rows are interleaved per head; undoing it gives transformers' weight back
        q = torch.from_numpy(gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data,
                                                     tensors["blk.0.attn_q.weight"].tensor_type).copy())
        expected = interleave_rotary_rows(state["model.layers.0.self_attn.q_proj.weight"], 4)
        torch.testing.assert_close(q, expected, atol=tolerance, rtol=0)
    if arch == "gpt2":  # Conv1D weights are transposed to (out, in)
        qkv = gguf.quants.dequantize(tensors["blk.0.attn_qkv.weight"].data, tensors["blk.0.attn_qkv.weight"].tensor_type)
        np.testing.assert_allclose(qkv, state["transformer.h.0.attn.c_attn.weight"].T.numpy(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_hparams_and_tokenizer(tmp_path, arch):
    folder = tiny_folder(tmp_path / "m", arch)
    out = tmp_path / "m.gguf"
    export(ExportConfig(model=str(folder), outtype="f16", output=str(out)))
    kv = fields(gguf.GGUFReader(out))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_arch = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[arch]
    assert kv["general.architecture"] == gguf_arch
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv[f"{gguf_arch}.block_count"] == 2 and kv[f"{gguf_arch}.embedding_length"] == 64
    assert kv["tokenizer.ggml.pre"] == {"llama": "smollm", "qwen2": "qwen2", "gpt2": "gpt-2"}[arch]
    vocab = tokenizer.get_vocab()
    assert kv["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tokenizer.chat_template
    special = kv["tokenizer.ggml.token_type"][tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert special == gguf.TokenType.CONTROL
    if arch == "llama":
        assert kv["llama.attention.head_count_kv"] == 2 and kv["llama.rope.dimension_count"] == 16


def test_untied_head_is_written(tmp_path):
    folder = tiny_folder(tmp_path / "m", "llama", tie=False)
    export(ExportConfig(model=str(folder), outtype="f32", output=str(tmp_path / "m.gguf")))
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" in names


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_lorakit_gguf_loading(tmp_path, arch):
    """The exported file loads back into lorakit (models.resolve_model reads GGUF) with the same greedy outputs."""
    from lorakit.infer.generate import GenerationConfig, generate

    folder = tiny_folder(tmp_path / "m", arch)
    out = tmp_path / "m.gguf"
    export(ExportConfig(model=str(folder), outtype="f32", output=str(out)))
    prompts = ["Move forward", "ros2 topic", "The Eagle is", "def add(a, b):", "Zürich café 123"]
    config = GenerationConfig(max_new_tokens=12, batch_size=8)
    original = generate(load_causal_lm(folder), load_tokenizer(folder), prompts, config)
    reloaded = generate(load_causal_lm(out), load_tokenizer(out), prompts, config)
    assert reloaded == original


def test_unsupported_architecture_is_one_line(tmp_path):
    from export_models import styled_tokenizer
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = styled_tokenizer("gpt2")
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                             num_attention_heads=2, word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    with pytest.raises(ExportError) as info:
        export(ExportConfig(model=str(tmp_path / "opt"), output=str(tmp_path / "opt.gguf")))
    message = str(info.value)
    assert "OPTForCausalLM" in message and "LlamaForCausalLM" in message and "\n" not in message
    assert not list(tmp_path.glob("*.gguf*"))


def test_named_chat_templates_and_a_bos_only_the_config_names_are_written(tmp_path):
    """Several named templates: each is written, the default as tokenizer.chat_template (as llama.cpp's converter
    writes them); a tokenizer without a BOS (Qwen2's) takes the config's, so llama.cpp does not fall back to its own."""
    from lorakit.export.gguf_vocab import vocab_from_tokenizer

    tokenizer = styled_tokenizer("qwen2")
    tokenizer.bos_token = None
    tokenizer.chat_template = {"default": "{{ messages }}", "tool_use": "{{ tools }}"}
    vocab = vocab_from_tokenizer(tokenizer, len(tokenizer), SimpleNamespace(bos_token_id=0, eos_token_id=[7, 8]))
    assert vocab.special_ids["bos"] == 0 and vocab.special_ids["eos"] == tokenizer.eos_token_id
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", arch="qwen2")
    vocab.write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    written = fields(gguf.GGUFReader(tmp_path / "v.gguf"))
    assert written["tokenizer.chat_template"] == "{{ messages }}"
    assert written["tokenizer.chat_template.tool_use"] == "{{ tools }}"
    assert written["tokenizer.ggml.bos_token_id"] == 0
    for outside in (-1, len(tokenizer)):  # a config's -1, or an id past the vocabulary: skipped, as by SpecialVocab
        config = SimpleNamespace(bos_token_id=outside)
        assert "bos" not in vocab_from_tokenizer(tokenizer, len(tokenizer), config).special_ids


def test_what_the_config_tells_is_refused_before_the_weights_load(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", "minilm-l6", "--output",
                           str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "lorakit export: error: GGUF export does not support BertModel; supported: GPT2LMHeadModel, LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM"], done.stderr  # not transformers' load report first


def test_a_gguf_model_names_the_export_without_its_suffix(tmp_path, monkeypatch):
    from lorakit.export import ExportConfig

    assert ExportConfig(model="models/base.gguf").output_path() == Path("base-f16.gguf")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert ExportConfig(model=".").output_path() == Path("here-f16.gguf")  # not '-f16.gguf'
    run = tmp_path / "my-run" / "adapter"
    run.mkdir(parents=True)
    assert ExportConfig(model="m", adapter=str(run), outtype="q8_0").output_path() == Path("my-run-q8_0.gguf")
