"""On the real embedded SmolLM2: a lorakit adapter generates the same greedy text under PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.tasks.ros2 import make_split

MODEL = "smollm2-135m-instruct"


@pytest.mark.slow
def test_real_model_adapter_generates_the_same_under_peft(tmp_path):
    tokenizer = load_tokenizer(MODEL)
    model = lorakit.inject(load_causal_lm(MODEL), lorakit.LoraConfig(r=8, lora_alpha=16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial update, as training would leave
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    lorakit.save_adapter(model, tmp_path)
    prompts = [f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in make_split("test", 20, seed=0)]
    config = GenerationConfig(max_new_tokens=24, batch_size=20)
    ours = generate(model, tokenizer, prompts, config)

    peft_model = PeftModel.from_pretrained(load_causal_lm(MODEL), tmp_path).eval()
    theirs = generate(peft_model, tokenizer, prompts, config)
    assert ours == theirs
    with lorakit.disable_adapters(model):
        assert generate(model, tokenizer, prompts[:4], config) != ours[:4]  # the adapter does change the text
