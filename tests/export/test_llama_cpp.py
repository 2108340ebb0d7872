"""Exports run in the real llama.cpp (llama-cpp-python, built from source by `make setup`):
same greedy tokens as transformers, the same logits for f32, the same tokenization, and a LoRA
adapter GGUF applied on the base giving what the merged export gives."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch
from export_models import ARCHS, styled_tokenizer, tiny_folder
from probe_strings import probe_strings
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import load_adapter, merge_and_unload
from lorakit.checkpoint.peft_io import save_adapter
from lorakit.config import LoraConfig
from lorakit.export import ExportConfig, export
from lorakit.export.llama_cpp_run import greedy_ids, load_llama, prompt_logits, tokenize
from lorakit.lora.inject import inject
from lorakit.models import load_causal_lm

PROMPTS = [
    "Move forward at 0.5 m/s", "ros2 topic pub /cmd_vel", "The Eagle is a coffee shop", "def add(a, b):",
    "Zürich café 東京", "I've been told", "1234 + 56.78 =", "Stop the robot now.", "return a", "  spaces\tand tabs",
    "Rotate left by 90 degrees", "near Burger King", "import numpy", "naïve résumé", "What is 2 + 2?",
    "\n\nnew lines", "ros2 service call /spawn", "It's cheap and", "for i in range(10):", "🚀 launch",
]


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=steps)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_runs_in_llama_cpp_as_in_transformers(tmp_path, arch):
    folder = tiny_folder(tmp_path / "m", arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = tmp_path / "m-f32.gguf"
    export(ExportConfig(model=str(folder), outtype="f32", output=str(out)))
    llm = load_llama(out, logits_all=True, f32_cache=True)
    for prompt in PROMPTS[:10]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert greedy_ids(llm, ids, 12, stop_ids=set()) == hf_greedy(model, ids, 12), prompt
    for prompt in PROMPTS[:5]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        # GPT-2's GELU comes from an f16 lookup table in llama.cpp's CPU backend: ~1e-3 of its own
        bound = 5e-3 if arch == "gpt2" else 1e-3
        assert np.abs(prompt_logits(llm, ids) - expected).max() < bound, prompt
    for outtype in ("f16", "q8_0"):  # the smaller types load and run too
        path = tmp_path / f"m-{outtype}.gguf"
        export(ExportConfig(model=str(folder), outtype=outtype, output=str(path)))
        assert len(greedy_ids(load_llama(path), tokenizer("Move")["input_ids"], 4, set())) == 4


@pytest.mark.parametrize("style", ["gpt2", "smollm", "qwen2", "llama3"])
def test_tokenizer_styles_tokenize_as_transformers(tmp_path, style):
    arch = {"gpt2": "gpt2", "qwen2": "qwen2"}.get(style, "llama")
    folder = tiny_folder(tmp_path / "m", arch, style)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = tmp_path / "m.gguf"
    export(ExportConfig(model=str(folder), outtype="f16", output=str(out)))
    llm = load_llama(out)
    mismatches = [s for s in probe_strings() if tokenize(llm, s) != tokenizer(s, add_special_tokens=False)["input_ids"]]
    if style == "qwen2":  # Qwen2's tokenizer normalises to NFC first, llama.cpp does not: only non-NFC text differs
        assert all(unicodedata.normalize("NFC", s) != s for s in mismatches), mismatches
        mismatches = [s for s in mismatches if tokenize(llm, unicodedata.normalize("NFC", s))
                      != tokenizer(s, add_special_tokens=False)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of 1000 differ, e.g. {mismatches[:3]!r}"
    assert styled_tokenizer(style).backend_tokenizer.pre_tokenizer is not None


LORA_CASES = {
    "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rank_pattern": LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"k_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 4.0},
    ),
    # on a base whose head is its own (a tied one is refused): llama.cpp looks the token's row up in A^T
    "embeddings": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_gguf_on_base_matches_merged_export(tmp_path, case):
    folder = tiny_folder(tmp_path / "m", "llama", tie=case != "embeddings")
    model = load_causal_lm(folder)
    inject(model, LORA_CASES[case])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter's size of update, so the greedy tokens really change
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    save_adapter(model, tmp_path / "adapter")
    paths = {kind: tmp_path / f"{kind}.gguf" for kind in ("merged", "base", "lora")}
    export(ExportConfig(model=str(folder), adapter=str(tmp_path / "adapter"), outtype="f32", output=str(paths["merged"])))
    export(ExportConfig(model=str(folder), outtype="f32", output=str(paths["base"])))
    export(ExportConfig(model=str(folder), adapter=str(tmp_path / "adapter"), format="gguf-lora", outtype="f32",
                        output=str(paths["lora"])))
    merged = load_llama(paths["merged"], logits_all=True, f32_cache=True)
    on_base = load_llama(paths["base"], lora=paths["lora"], logits_all=True, f32_cache=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = load_causal_lm(folder)
    load_adapter(reference, tmp_path / "adapter")
    reference = merge_and_unload(reference).eval()
    base_only = load_llama(paths["base"])
    changed = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens = greedy_ids(merged, ids, 10, set())
        assert greedy_ids(on_base, ids, 10, set()) == tokens, prompt
        assert hf_greedy(reference, ids, 10) == tokens, prompt
        changed += greedy_ids(base_only, ids, 10, set()) != tokens
        assert np.abs(prompt_logits(on_base, ids) - prompt_logits(merged, ids)).max() < 1e-3
    assert changed >= len(PROMPTS) // 2  # the adapter matters, so agreement is not by default


@pytest.mark.parametrize("trained", ["lm_head", "embed_tokens"])
def test_a_trained_copy_of_a_tied_weight_exports_as_the_adapted_model(tmp_path, trained):
    """modules_to_save on a weight the base ties (head and embeddings): the merged GGUF holds the two apart."""
    folder = tiny_folder(tmp_path / "m", "llama")  # tied
    model = load_causal_lm(folder)
    inject(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[trained]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name or ".copies." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    export(ExportConfig(model=str(folder), adapter=str(tmp_path / "adapter"), outtype="f32", output=str(out)))
    adapted = load_causal_lm(folder)
    load_adapter(adapted, tmp_path / "adapter")
    adapted.eval()
    llm = load_llama(out, logits_all=True, f32_cache=True)
    ids = AutoTokenizer.from_pretrained(folder)(PROMPTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = adapted(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - load_causal_lm(folder)(torch.tensor([ids])).logits[0].detach().numpy()).max() > 1
    assert np.abs(prompt_logits(llm, ids) - expected).max() < 1e-3
