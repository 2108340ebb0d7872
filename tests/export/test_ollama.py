"""The Modelfile: parsed back, its TEMPLATE renders exactly the prompt lorakit trained on."""

from __future__ import annotations

import json

import pytest
from export_models import styled_tokenizer, tiny_folder

from lorakit.data.templates import get_template
from lorakit.export import ExportConfig, ExportError, export
from lorakit.export.ollama import PLACEHOLDER, go_template, modelfile_for, parse_modelfile, render_template

INSTRUCTIONS = [
    "Move forward at 0.5 m/s for 3 seconds",
    "Rotate the turtle {left} by 90 degrees",  # braces: literal in the format string's argument
    "List all running nodes",
    'Publish "hello" on /chatter',
    "Stop the robot\nimmediately",
]


@pytest.mark.parametrize("spec", ["seed", "alpaca", "chat", "Q: {instruction} }} {{ A:"])
def test_template_renders_the_training_prompt(spec):
    template = get_template(spec, styled_tokenizer("gpt2"))
    rendered = template.render({"instruction": PLACEHOLDER, "output": ""})[0]
    text = modelfile_for("m.gguf", rendered, ["<|im_end|>"], greedy=True).text()
    parsed = parse_modelfile(text)
    assert parsed.source == "./m.gguf"
    assert parsed.parameters == [("stop", "<|im_end|>"), ("temperature", "0")]
    for instruction in INSTRUCTIONS:
        expected = template.render({"instruction": instruction, "output": ""})[0]
        assert render_template(parsed.template, instruction) == expected


def test_braces_are_escaped_for_go_templates():
    assert go_template(f"{{{{x}}}} {PLACEHOLDER}") == '{{ "{{" }}x{{ "}}" }} {{ .Prompt }}'


def test_export_writes_modelfile_beside_the_gguf(tmp_path):
    folder = tiny_folder(tmp_path / "m", "llama")
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    out = tmp_path / "out.gguf"
    (adapter / "lorakit.json").write_text(json.dumps({"template": "seed", "task": "ros2"}))
    from lorakit.checkpoint.peft_io import save_adapter
    from lorakit.config import LoraConfig
    from lorakit.lora.inject import inject
    from lorakit.models import load_causal_lm

    model = load_causal_lm(folder)
    inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, adapter)
    result = export(ExportConfig(model=str(folder), adapter=str(adapter), outtype="f32", output=str(out), ollama=True))
    assert result.modelfile == tmp_path / "Modelfile"
    parsed = parse_modelfile(result.modelfile.read_text())
    assert parsed.source == "./out.gguf"
    assert ("stop", "<|im_end|>") in parsed.parameters and ("temperature", "0") in parsed.parameters
    seed = get_template("seed")
    assert render_template(parsed.template, "go") == seed.render({"instruction": "go", "output": ""})[0]
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export(ExportConfig(model=str(folder), adapter=str(adapter), output=str(tmp_path / "other.gguf"), ollama=True))


def test_a_chat_template_that_writes_the_bos_gives_ollama_one_bos(tmp_path):
    """A Llama-3-style tokenizer adds BOS and its chat template writes it too: the GGUF says add_bos, so Ollama (as
    llama.cpp) puts BOS in front of the TEMPLATE itself; the TEMPLATE must not hold a second one."""
    import torch
    from llama_cpp import Llama
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = styled_tokenizer("smollm")
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    # a format template writing the BOS text is tokenised with the BOS added as well, by lorakit as by Ollama
    for spec, bos_count in [("chat", 1), ("<|endoftext|>Q: {instruction}\nA:", 2)]:
        result = export(ExportConfig(model=str(tmp_path / "m"), outtype="f32", output=str(tmp_path / "m.gguf"),
                                     ollama=True, force=True, template=spec))
        template = parse_modelfile(result.modelfile.read_text()).template
        chosen = get_template(spec, tokenizer)
        prompt = chosen.render({"instruction": "hi there", "output": ""})[0]
        ours = tokenizer(prompt, add_special_tokens=not chosen.special_tokens_in_prompt)["input_ids"]
        assert ours[:bos_count + 1].count(tokenizer.bos_token_id) == bos_count, (spec, ours)
        llama = Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, n_threads=1)
        assert llama.tokenize(render_template(template, "hi there").encode(), add_bos=True, special=True) == ours
        del llama
