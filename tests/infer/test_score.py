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
