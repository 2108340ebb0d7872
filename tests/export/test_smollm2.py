"""The embedded SmolLM2-135M-Instruct exported and run in llama.cpp: its tokenizer on 1,000 varied
strings, and greedy completions of the seed prompt against lorakit generate."""

from __future__ import annotations

import pytest
from probe_strings import probe_strings

from lorakit.data.templates import get_template
from lorakit.export import ExportConfig, export
from lorakit.export.llama_cpp_run import greedy_ids, load_llama, tokenize
from lorakit.infer.generate import GenerationConfig, generate, stop_token_ids
from lorakit.models import load_causal_lm, load_tokenizer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.gguf"
    export(ExportConfig(model=MODEL, outtype="f16", output=str(out)))
    return out


def test_tokenizer_matches_on_1000_strings(smollm2_f16):
    tokenizer = load_tokenizer(MODEL)
    llm = load_llama(smollm2_f16)
    strings = probe_strings()
    mismatched = [s for s in strings if tokenize(llm, s) != tokenizer(s, add_special_tokens=False)["input_ids"]]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} differ, e.g. {mismatched[:3]!r}"


def test_greedy_completions_match_lorakit(smollm2_f16):
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL)
    template = get_template("seed")
    instructions = ["Move forward at 0.5 m/s", "Turn left by 90 degrees", "Stop the robot",
                    "List the running nodes", "Spawn a turtle at x 2 and y 3"]
    prompts = [template.render({"instruction": i, "output": ""})[0] for i in instructions]
    ours = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=24, batch_size=8))
    llm = load_llama(smollm2_f16)
    stop = set(stop_token_ids(tokenizer, model))
    theirs = [llm.detokenize(greedy_ids(llm, llm.tokenize(p.encode(), add_bos=True, special=True), 24, stop))
              .decode().strip() for p in prompts]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 4, list(zip(ours, theirs))  # f16 rounding may flip one near-tie
