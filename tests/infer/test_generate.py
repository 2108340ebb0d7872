"""Batched generation on a tiny model: beam search with left padding, n-gram blocking, greedy as argmax."""

from __future__ import annotations

import torch
from tokenizers.processors import TemplateProcessing

from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import load_causal_lm, load_tokenizer
from conftest import toy_model_folder

PROMPTS = ["### Instruction:\nsay red\n\n### Command:\n", "### Instruction:\nsay a long gold and grey thing\n\n### Command:\n",
           "say", "### Instruction:\nsay pink\n\n"]


def test_beam_search_in_a_left_padded_batch_equals_one_prompt_at_a_time(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    beams = dict(max_new_tokens=10, num_beams=4, length_penalty=0.9, no_repeat_ngram_size=2)
    batched = generate(model, tokenizer, PROMPTS, GenerationConfig(batch_size=4, **beams))
    alone = generate(model, tokenizer, PROMPTS, GenerationConfig(batch_size=1, **beams))
    assert batched == alone
    greedy = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
    assert batched != greedy  # the options reach transformers' generate


def test_no_repeat_ngram_size_blocks_repeats(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    free = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=16))
    blocked = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=16, no_repeat_ngram_size=1))
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in free]
    assert any(len(set(i)) < len(i) for i in ids)  # an untrained model repeats itself...
    assert blocked != free  # ...and blocking every repeated token changes what it writes


def test_stop_strings_cut_after_leading_whitespace():
    from lorakit.infer.generate import _cut

    assert _cut("\n\nThe Vaults is a pub.\nA: more", ("\n",)) == "The Vaults is a pub."
    assert _cut("red red</s>", ("</s>", "\n")) == "red red"


def test_no_repeat_ngram_blocks_repeats_of_the_output_not_of_the_prompt():
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from lorakit.infer.generate import NewTokensNoRepeatNGram

    prompt, generated = [1, 2, 3, 4], [5, 6, 7, 5, 6, 1, 2]  # the output ends "1 2"
    ids = torch.tensor([prompt + generated])
    scores = torch.zeros(1, 10)
    ours = NewTokensNoRepeatNGram(3, len(prompt))(ids, scores.clone())
    theirs = NoRepeatNGramLogitsProcessor(3)(ids, scores.clone())
    assert theirs[0, 3] == -float("inf") and ours[0, 3] == 0  # "1 2 3" is only in the prompt
    ids = torch.tensor([prompt + generated[:5]])  # now the output ends "5 6", seen before as "5 6 7"
    assert NewTokensNoRepeatNGram(3, len(prompt))(ids, scores.clone())[0, 7] == -float("inf")


def _argmax(model, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x).logits[0, -1].argmax().view(1, 1)], 1)
    return x[0, len(ids):].tolist()


def test_greedy_is_argmax_over_the_prompt_as_training_lays_it_out(tmp_path):
    """A tokenizer that appends EOS to every sequence, and a generation_config.json asking for a repetition penalty
    and sampling: the prompt is BOS + text (no EOS, as in training) and temperature 0 is still argmax."""
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).eval()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    model.generation_config.update(repetition_penalty=3.0, do_sample=True, top_k=2, min_new_tokens=8)
    for prompt in PROMPTS:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        steps = _argmax(model, ids, 8)
        if tokenizer.eos_token_id in steps:
            steps = steps[: steps.index(tokenizer.eos_token_id)]
        (text,) = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=8))
        assert text == tokenizer.decode(steps, skip_special_tokens=True), prompt
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is left as it was
