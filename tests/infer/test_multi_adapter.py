"""Mixed-adapter generation: each request's output equals generating it alone with its adapter merged."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.infer.decode_step import through_the_forward
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.infer.multi_adapter import Request, generate_mixed
from lorakit.models import load_causal_lm, load_tokenizer

NAMES = ["a", "b", "c", "d"]
PROMPTS = ["say red", "say green and", "### Instruction:\nsay blue", "gold", "say pink pink", "white grey"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy model folder and four saved adapters of different ranks."""
    root = tmp_path_factory.mktemp("toy")
    folder = toy_model_folder(root / "model")
    model = load_causal_lm(folder)
    for seed, name in enumerate(NAMES):
        lorakit.inject(
            model, lorakit.LoraConfig(r=2 + 2 * seed, lora_alpha=8, target_modules=TOY_TARGETS), name
        )
        perturb(model, name, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / name, name)
    return folder, root


def merged_model(folder, adapter_dir):
    """A plain model with the adapter folded in (None: the base)."""
    model = load_causal_lm(folder)
    if adapter_dir is not None:
        lorakit.load_adapter(model, adapter_dir)
        lorakit.merge_and_unload(model)
    return model


def merged_output(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """transformers' own generate on the merged model, one request alone."""
    config = GenerationConfig(max_new_tokens=max_tokens, add_special_tokens=False)
    return generate(model, tokenizer, [prompt], config)[0]



def loaded(toy, names):
    """The toy base with the named adapters loaded, and its tokenizer."""
    folder, root = toy
    model = load_causal_lm(folder)
    for name in names:
        lorakit.load_adapter(model, root / name, name)
    return load_tokenizer(folder), model

def test_mixed_batch_equals_merged_single_requests(toy):
    folder, root = toy
    tokenizer, model = loaded(toy, NAMES)
    plan = [("a", 12), ("b", 5), (None, 9), ("c", 12), ("d", 3), ("a", 7), ("b", 12), ("d", 10)]
    requests = [
        Request(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"], adapter, max_tokens)
        for i, (adapter, max_tokens) in enumerate(plan)
    ]
    merged = {name: merged_model(folder, name and root / name) for name in [None, *NAMES]}
    expected = [
        merged_output(merged[adapter], tokenizer, PROMPTS[i % len(PROMPTS)], max_tokens)
        for i, (adapter, max_tokens) in enumerate(plan)
    ]
    for strategy in ("gathered", "grouped"):
        got = generate_mixed(model, tokenizer, requests, strategy=strategy)
        assert [c.text.strip() for c in got] == expected, strategy
        assert all(len(c.token_ids) <= max_tokens for c, (_, max_tokens) in zip(got, plan))
    outputs = {c.text for c in got[:1] + got[3:5]}
    assert len(outputs) > 1  # the adapters do differ


def test_prompts_of_mixed_lengths_are_prefilled_without_padding(toy):
    """The prompt pass runs lorakit's walk (no decoder layer forward, no pad token computed) and gives the
    outputs of the padded pass through the model's forward."""
    tokenizer, model = loaded(toy, NAMES)
    requests = [Request(tokenizer(p)["input_ids"], a, 8) for p, a in zip(PROMPTS, ["a", None, "b", "c", "d", "a"])]
    assert len({len(r.prompt_ids) for r in requests}) > 1
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(args[1][0].shape))
    try:
        lean = generate_mixed(model, tokenizer, requests)
        assert not calls, "the decoder layers' forward ran"
        with through_the_forward():
            padded = generate_mixed(model, tokenizer, requests)
    finally:
        hook.remove()
    assert calls[0][:2] == (len(requests), max(len(r.prompt_ids) for r in requests))  # the padded prompt pass
    assert [c.token_ids for c in lean] == [c.token_ids for c in padded]


def test_stop_strings_streaming_and_sampling(toy):
    tokenizer, model = loaded(toy, NAMES[:2])
    prompt = tokenizer("say red")["input_ids"]
    full = generate_mixed(model, tokenizer, [Request(prompt, "a", 16)])[0]
    assert full.finish_reason == "length" and len(full.text) > 4
    stop = full.text[3:5]
    pieces: list[str] = []
    greedy = Request(prompt, "a", 16, stop=(stop,))
    sampled = [Request(prompt, "b", 8, temperature=0.9, top_p=0.8, seed=s) for s in (1, 1, 2)]
    got = generate_mixed(
        model, tokenizer, [greedy, *sampled], on_text=lambda i, t: pieces.append(t) if i == 0 else None
    )
    assert got[0].text == full.text[: full.text.index(stop)] and got[0].finish_reason == "stop"
    assert "".join(pieces) == got[0].text  # the stream never shows part of a stop string
    assert got[1].token_ids == got[2].token_ids  # same seed, same tokens, whatever else is in the batch
    alone = generate_mixed(model, tokenizer, [sampled[0]])[0]
    assert alone.token_ids == got[1].token_ids


def test_cancel_and_bad_requests(toy):
    tokenizer, model = loaded(toy, ["a"])
    prompt = tokenizer("say red")["input_ids"]
    got = generate_mixed(
        model, tokenizer, [Request(prompt, "a", 20), Request(prompt, None, 20)], on_text=lambda i, t: i != 0
    )
    assert got[0].finish_reason == "cancelled" and len(got[0].token_ids) == 1
    assert len(got[1].token_ids) == 20 or got[1].finish_reason == "stop"
    with pytest.raises(ValueError, match="max_tokens"):
        generate_mixed(model, tokenizer, [Request(prompt, "a", 0)])
    with torch.no_grad(), pytest.raises(KeyError):
        generate_mixed(model, tokenizer, [Request(prompt, "nope", 3)])


def test_eos_ends_a_row(toy):
    tokenizer, model = loaded(toy, ["a"])
    prompt = tokenizer("say red")["input_ids"]
    full = generate_mixed(model, tokenizer, [Request(prompt, "a", 10), Request(prompt, None, 10)])
    eos = full[0].token_ids[3]
    model.generation_config.eos_token_id = eos  # as if the adapter had learnt to stop there
    got = generate_mixed(model, tokenizer, [Request(prompt, "a", 10), Request(prompt, None, 10)])

    def until_eos(ids: list[int]) -> list[int]:
        return ids[: ids.index(eos)] if eos in ids else ids

    assert got[0].finish_reason == "stop" and got[0].token_ids == until_eos(full[0].token_ids)
    assert got[1].token_ids == until_eos(full[1].token_ids)  # the other row runs on undisturbed


def test_a_batch_runs_its_rows_grouped_by_adapter_and_answers_in_request_order(toy, monkeypatch):
    from lorakit.infer import multi_adapter

    tokenizer, model = loaded(toy, ["a", "b"])
    plan = ["b", "a", None, "b", "a"]
    requests = [Request(tokenizer(PROMPTS[i])["input_ids"], adapter, 6) for i, adapter in enumerate(plan)]
    assert multi_adapter.by_adapter(requests) == [2, 1, 4, 0, 3]
    seen = []
    real = multi_adapter.row_adapters
    monkeypatch.setattr(multi_adapter, "row_adapters",
                        lambda m, names, *a: seen.append(list(names)) or real(m, names, *a))
    streamed = {}
    got = generate_mixed(model, tokenizer, requests, on_text=lambda i, t: streamed.update({i: streamed.get(i, "") + t}))
    assert seen[-1] == [None, "a", "a", "b", "b"]  # the steps' rows, one adapter's next to each other
    assert [streamed[i] for i in range(len(requests))] == [c.text for c in got]  # streamed under each request's index
    for request, completion in zip(requests, got, strict=True):
        assert generate_mixed(model, tokenizer, [request])[0].token_ids == completion.token_ids
