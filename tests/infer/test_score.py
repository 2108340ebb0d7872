"""Scoring generations: a multi-reference task generates each distinct prompt once."""

from __future__ import annotations

import pytest

from lorakit.config import EvalConfig
from lorakit.data.templates import get_template
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.infer.score import score_generations
from lorakit.models import load_causal_lm, load_tokenizer
from conftest import toy_model_folder


def test_multi_reference_task_groups_references_by_prompt(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    template = get_template("seed")
    records = [{"instruction": "say red", "output": "red red"}, {"instruction": "say blue", "output": "blue blue"},
               {"instruction": "say red", "output": "a red one"}]
    config = EvalConfig(task="e2e", max_new_tokens=8, batch_size=4, samples=10)
    scores = score_generations(model, tokenizer, records, template, config)
    assert [s["instruction"] for s in scores["samples"]] == ["say red", "say blue"]  # one generation per prompt
    # The score is that of each prompt's output against all of its references.
    preds = generate(model, tokenizer, [template.render(r)[0] for r in records[:2]], GenerationConfig(max_new_tokens=8))
    from lorakit.tasks.e2e import score

    assert scores["bleu"] == pytest.approx(score(preds, [["red red", "a red one"], ["blue blue"]])["bleu"])
    single = score_generations(model, tokenizer, records, template, EvalConfig(task=None, max_new_tokens=8, samples=10))
    assert len(single["samples"]) == 3  # other tasks keep one generation per record


def test_conversations_are_scored_per_turn_and_per_conversation(tmp_path):
    """Each assistant turn is generated after the reference history; a conversation counts if all its turns do."""
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    tokenizer.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                               "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    template = get_template("chat", tokenizer)
    user, assistant = "user", "assistant"
    conversations = [[(user, "say red"), (assistant, "red red"), (user, "say blue"), (assistant, "blue blue")],
                     [(user, "say gold"), (assistant, "gold gold")]]
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in conversations]
    # the references are the model's own greedy replies, except the second turn of the first conversation
    prompts = [template.render({"messages": r["messages"][:end]})[0] for r, end in ((records[0], 2), (records[0], 4),
                                                                                   (records[1], 2))]
    own = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=8, add_special_tokens=False))
    records[0]["messages"][1]["content"], records[1]["messages"][1]["content"] = own[0], own[2]
    records[0]["messages"][3]["content"] = own[1] + " not this"
    scores = score_generations(model, tokenizer, records, template, EvalConfig(max_new_tokens=8, samples=1),
                               keep_rows=True)
    assert scores["turns"] == 3 and scores["conversations"] == 2
    assert [(row["turn"], row["scores"]["exact_match"]) for row in scores["rows"]] == [(1, 1.0), (2, 0.0), (1, 1.0)]
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["exact_match_turn1"] == 1.0 and scores["exact_match_turn2"] == 0.0
    assert scores["conversation_exact_match"] == 0.5
    assert [(s["instruction"], s["turn"]) for s in scores["samples"]] == [("say red", 1), ("say blue", 2)]
