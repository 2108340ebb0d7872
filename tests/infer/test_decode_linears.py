"""use_decode_linears: every plain Linear of a serving model, the head included, decodes through
decode_linear, and greedy generation is unchanged."""

from __future__ import annotations

import torch
from torch import nn

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.infer.decode_linears import use_decode_linears
from lorakit.infer.multi_adapter import Request, generate_mixed
from lorakit.lora.base import FrozenLinear
from lorakit.models import load_causal_lm, load_tokenizer


def test_a_merged_model_decodes_the_same_tokens_through_frozen_linears(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer = load_tokenizer(folder)
    model = load_causal_lm(folder).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS), "a")
    perturb(model, "a", std=0.3)
    model = lorakit.merge_and_unload(model)
    requests = [Request(tokenizer(p)["input_ids"], None, max_tokens=12, ignore_eos=True)
                for p in ["turn left", "go to the door and stop", "hello"]]
    before = [c.token_ids for c in generate_mixed(model, tokenizer, requests)]
    one_row = torch.tensor([requests[1].prompt_ids])
    with torch.no_grad():
        logits = model(one_row).logits
    plain = sum(type(m) is nn.Linear for m in model.modules())

    assert use_decode_linears(model) is model
    converted = [m for m in model.modules() if type(m) is FrozenLinear]
    assert len(converted) == plain > 0 and not any(type(m) is nn.Linear for m in model.modules())
    assert model.get_output_embeddings() in converted
    with torch.no_grad():
        assert torch.allclose(model(one_row).logits, logits, atol=1e-5)
    assert [c.token_ids for c in generate_mixed(model, tokenizer, requests)] == before
