"""When evaluations and checkpoints fall due, which way the best metric points, and what keep-best hands back."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.run import run
from lorakit.train.checkpoints import due, greater_is_better, improves, unevaluated_saves


@pytest.mark.parametrize(
    ("strategy", "step", "epoch_end", "out_of_time", "expected"),
    [
        ("steps", 30, False, False, True),  # every 10 steps
        ("steps", 31, True, False, False),  # the end of an epoch does not count under "steps"
        ("steps", 31, False, True, True),  # a time-budget stop evaluates and saves its last step
        ("epoch", 30, False, False, False),
        ("epoch", 31, True, False, True),
        ("no", 30, True, True, False),
    ],
)
def test_due_follows_the_strategy(strategy, step, epoch_end, out_of_time, expected):
    assert due(strategy, 10, step, epoch_end, out_of_time) is expected


@pytest.mark.parametrize(
    ("metric", "explicit", "expected"),
    [("eval_loss", None, False), ("eval_perplexity", None, False), ("eval_accuracy", None, True),
     ("eval_bleu", None, True), ("eval_loss", True, True), ("eval_accuracy", False, False)],
)
def test_greater_is_better_is_inferred_from_the_name_unless_set(metric, explicit, expected):
    assert greater_is_better(TrainConfig(metric_for_best=metric, greater_is_better=explicit)) is expected


@pytest.mark.parametrize("value, best, greater, expected", [
    (0.5, None, False, True), (0.4, 0.5, False, True), (0.6, 0.5, False, False), (0.6, 0.5, True, True),
    (float("nan"), None, False, False),  # chosen first, a NaN would never be beaten
    (float("nan"), 0.5, True, False), (float("inf"), 0.5, True, False), (None, None, False, False),
])
def test_a_value_improves_on_the_best_only_as_a_finite_number(value, best, greater, expected):
    assert improves(value, best, greater) is expected


@pytest.mark.parametrize("eval_strategy, save_strategy, expected", [
    (("steps", 5), ("steps", 3), ([3, 6, 9, 12], 1)),  # 15 is weighed; 5 and 10 are not saved, 16 not evaluated
    (("steps", 2), ("steps", 4), ([], 4)),  # HF's rule: saves a multiple of evaluations
    (("steps", 4), ("epoch", 0), ([6], 2)),  # epochs of 6 steps end at 6 (not evaluated) and the last, 16
    (("epoch", 0), ("epoch", 0), ([], 3)),
    (("no", 0), ("steps", 3), ([], 0)),  # nothing to weigh: the eval split is scored once, after training
])
def test_unevaluated_saves_are_the_checkpoints_keep_best_cannot_weigh(eval_strategy, save_strategy, expected):
    config = TrainConfig(eval_strategy=eval_strategy[0], eval_steps=eval_strategy[1] or 100,
                         save_strategy=save_strategy[0], save_steps=save_strategy[1] or 100)
    assert unevaluated_saves(config, total_steps=16, steps_per_epoch=6) == expected


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep-best")
    for name, records in (("train", TOY_TASK * 4), ("eval", TOY_TASK[:4]), ("other_eval", TOY_TASK[4:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, toy_model_folder(root / "model")


def _config(toy, out: Path, **train) -> RunConfig:
    root, model = toy
    settings = dict(output_dir=str(out), max_steps=12, batch_size=4, lr=5e-3, eval_strategy="steps", eval_steps=2,
                    save_strategy="steps", save_steps=2, save_total_limit=None, progress=False)
    return RunConfig(model=str(model), lora=LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS),
                     data=DataConfig(train_file=str(root / "train.jsonl"), eval_file=str(root / "eval.jsonl"),
                                     max_length=64),
                     train=TrainConfig(**{**settings, **train}))


def _evals(out: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["eval_loss"] for e in events if e["kind"] == "eval"}


def test_an_evaluated_last_step_is_saved_so_keep_best_weighs_it(toy, tmp_path):
    summary = run(_config(toy, tmp_path, save_steps=5), echo=lambda line: None)  # saves 5, 10 and the last, 12
    evals = _evals(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000005", "step-000010", "step-000012"]
    assert summary["selection"]["value"] == min(evals[10], evals[12])


def test_without_checkpoints_the_final_score_is_the_last_steps_evaluation(toy, tmp_path):
    summary = run(_config(toy, tmp_path, save_strategy="no"), echo=lambda line: None)
    assert summary["final_score"]["scores"]["eval_loss"] == _evals(tmp_path)[12]


def test_saves_on_unevaluated_steps_are_named_once(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run(_config(toy, tmp_path, eval_steps=4, save_steps=3), echo=lambda line: None)  # saves 3, 6, 9 and 12
    said = [r.getMessage() for r in caplog.records if "keep-best cannot weigh" in r.getMessage()]
    assert said == ["3 of the run's 4 checkpoints fall on steps that are not evaluated (the first at step 3): "
                    "keep-best cannot weigh them; make train.save_steps a multiple of train.eval_steps (or both "
                    "strategies epoch)"]


def test_a_misspelt_metric_for_best_is_named_once(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run(_config(toy, tmp_path, metric_for_best="eval_los"), echo=lambda line: None)
    said = [r.getMessage() for r in caplog.records if "metric_for_best" in r.getMessage()]
    assert said == ["train.metric_for_best 'eval_los' is not among the eval metrics (eval_loss); keep-best chooses "
                    "nothing"]


def test_a_resume_on_another_eval_split_starts_keep_best_afresh(toy, tmp_path, caplog):
    root, _ = toy
    run(_config(toy, tmp_path, max_steps=6), echo=lambda line: None)
    resumed = _config(toy, tmp_path, resume=True)
    resumed.data = replace(resumed.data, eval_file=str(root / "other_eval.jsonl"))
    with caplog.at_level(logging.WARNING):
        summary = run(resumed, echo=lambda line: None)
    assert any("was chosen with data.eval_file" in r.getMessage() for r in caplog.records)
    evals = _evals(tmp_path)
    assert summary["selection"]["value"] == min(evals[s] for s in (8, 10, 12))  # measured on the new split only


def test_a_resume_names_the_model_folder_any_way_and_says_when_it_is_past_max_steps(toy, tmp_path, caplog,
                                                                                     monkeypatch):
    root, model = toy
    run(_config(toy, tmp_path, max_steps=4), echo=lambda line: None)
    monkeypatch.chdir(Path(model).parent)
    again = _config(toy, tmp_path, max_steps=2, resume=True)
    again.model = Path(model).name  # the same folder, by a relative path
    with caplog.at_level(logging.WARNING):
        summary = run(again, echo=lambda line: None)
    assert summary["steps"] == 4
    assert any("past this run's 2 steps" in r.getMessage() for r in caplog.records)


def test_the_logged_loss_is_the_mean_since_the_last_log_and_the_rate_the_step_took(toy, tmp_path):
    """As transformers' Trainer logs them: loss averaged over the logging window, lr as applied at the step."""
    run(_config(toy, tmp_path / "every", logging_steps=1), echo=lambda line: None)
    run(_config(toy, tmp_path / "fourth", logging_steps=4), echo=lambda line: None)
    every, fourth = ({e["step"]: e for e in _all_events(tmp_path / name) if e["kind"] == "train"}
                     for name in ("every", "fourth"))
    assert sorted(fourth) == [4, 8, 12]
    for step in fourth:
        assert fourth[step]["loss"] == pytest.approx(sum(every[s]["loss"] for s in range(step - 3, step + 1)) / 4)
        assert fourth[step]["lr"] == every[step]["lr"]
    assert every[1]["lr"] == 5e-3 and every[12]["lr"] > 0  # the first step at the peak (no warm-up), the last not 0


def _all_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
