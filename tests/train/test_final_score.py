"""Three splits: eval chooses the checkpoint and every number printed while training; test is scored once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder
from lorakit.config import ConfigError, DataConfig, EvalConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.config_loading import load_run_config
from lorakit.run import run
from lorakit.train.final_score import describe_splits, eval_printer, final_score_line, selection_line

EVAL, TEST = TOY_TASK[:4], TOY_TASK[4:]  # disjoint, so their losses differ


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    return {
        "model": str(toy_model_folder(root / "model")),
        "train": _write(root / "train.jsonl", TOY_TASK * 4),
        "eval": _write(root / "eval.jsonl", EVAL),
        "test": _write(root / "test.jsonl", TEST),
        "other_test": _write(root / "other_test.jsonl", [{"instruction": "say nothing", "output": "silence"}] * 3),
    }


def _run_config(files: dict, out: Path, test: str | None, task: str | None) -> RunConfig:
    return RunConfig(
        model=files["model"],
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS),
        data=DataConfig(train_file=files["train"], eval_file=files["eval"], test_file=test, max_length=64),
        train=TrainConfig(output_dir=str(out), max_steps=24, batch_size=4, lr=5e-3, eval_strategy="steps",
                          eval_steps=6, save_strategy="steps", save_steps=6, save_total_limit=None, progress=False),
        eval=EvalConfig(task=task, max_new_tokens=6, batch_size=8, samples=0),
    )


def _run(config: RunConfig) -> tuple[dict, list[str]]:
    lines: list[str] = []
    summary = run(config, echo=lines.append)
    return summary, lines


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def with_test(toy_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("with-test")
    return (*_run(_run_config(toy_files, out, toy_files["test"], "ros2")), out)


def test_checkpoint_is_chosen_on_the_eval_split(with_test):
    summary, _, out = with_test
    evals = [e for e in _events(out) if e["kind"] == "eval" and "eval_loss" in e]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert summary["selection"]["split"] == "eval" and summary["selection"]["source"].endswith("eval.jsonl")
    assert summary["selection"]["value"] == pytest.approx(best["eval_loss"])
    assert summary["selection"]["checkpoint"].endswith(f"step-{best['step']:06d}")
    assert not [k for e in evals for k in e if k.startswith("test_")]


def test_test_split_is_scored_once_with_the_chosen_checkpoint(with_test, toy_files):
    import lorakit
    from lorakit.data.masking import tokenize_dataset
    from lorakit.models import load_causal_lm, load_tokenizer
    from lorakit.train.objectives import CausalLMObjective

    summary, _, out = with_test
    final = summary["final_score"]
    assert final["split"] == "test" and final["source"] == toy_files["test"] and not final["same_split_as_selection"]
    tests = [e for e in _events(out) if e["kind"] == "test"]
    assert [e["step"] for e in tests] == [0, summary["steps"]]  # the base, then the chosen checkpoint, once each

    tokenizer = load_tokenizer(toy_files["model"])  # the saved adapter, scored again from scratch
    model = load_causal_lm(toy_files["model"])
    lorakit.load_adapter(model, out / "adapter")
    examples, _ = tokenize_dataset(tokenizer, TEST, "seed", 64)
    with torch.no_grad():
        expected = CausalLMObjective(tokenizer.pad_token_id).evaluate(model.eval(), examples, 4, "cpu")["eval_loss"]
    assert final["scores"]["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= final["scores"]["test_exact_match"] <= 1.0
    assert final["scores"]["test_loss"] != pytest.approx(summary["selection"]["value"], rel=1e-3)


def test_printed_lines_name_the_eval_split_while_training_and_test_once_at_the_end(with_test, toy_files):
    _, lines, _ = with_test
    during = [line for line in lines if line.startswith("step ")]
    assert len(during) == 4 and all(f"eval split ({toy_files['eval']})" in line for line in during)
    assert not [line for line in during if toy_files["test"] in line or "test_" in line]
    finals = [line for line in lines if line.startswith("final score")]
    assert len(finals) == 1 and f"the test split ({toy_files['test']})" in finals[0]
    assert lines.index(finals[0]) == len(lines) - 1
    assert any(line.startswith("checkpoint chosen on the eval split") for line in lines)


def test_another_test_file_changes_nothing_but_the_final_score(with_test, toy_files, tmp_path):
    summary, _, out = with_test
    other, _ = _run(_run_config(toy_files, tmp_path, toy_files["other_test"], "ros2"))
    def evals(path: Path) -> list[tuple[int, float]]:
        return [(e["step"], e["eval_loss"]) for e in _events(path) if e["kind"] == "eval"]

    assert evals(tmp_path) == evals(out)
    assert Path(other["selection"]["checkpoint"]).name == Path(summary["selection"]["checkpoint"]).name
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert other["final_score"]["scores"]["test_loss"] != pytest.approx(summary["final_score"]["scores"]["test_loss"])


def test_without_a_test_file_the_summary_says_the_eval_split_chose_and_scored(toy_files, tmp_path):
    summary, lines = _run(_run_config(toy_files, tmp_path, None, None))
    final = summary["final_score"]
    assert final["split"] == "eval" and final["same_split_as_selection"]
    assert final["scores"]["eval_loss"] == pytest.approx(summary["selection"]["value"])
    assert "the split that chose the checkpoint" in lines[-1]
    assert json.loads((tmp_path / "summary.json").read_text())["final_score"] == final


def test_eval_strategy_no_scores_the_eval_split_once_after_training(toy_files, tmp_path):
    config = _run_config(toy_files, tmp_path, None, None)
    config.train = TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=4, lr=5e-3, eval_strategy="no",
                               save_strategy="no", progress=False)
    summary, lines = _run(config)
    evals = [e for e in _events(tmp_path) if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [6]  # none while training, one after the last step
    final = summary["final_score"]
    assert final["split"] == "eval" and not final["same_split_as_selection"]
    assert final["scores"]["eval_loss"] == pytest.approx(evals[0]["eval_loss"])
    assert "which chose nothing: eval_loss" in lines[-1]


def test_summary_lines_for_a_run_that_evaluated_nothing():
    data, train = DataConfig(train_file="t.jsonl", eval_size=0.2), TrainConfig(eval_strategy="no")
    summary = describe_splits(data, train, None, None)
    summary["final_score"]["scores"] = {}
    assert summary["selection"]["source"] == "held out of t.jsonl (data.eval_size 0.2)"
    assert selection_line(summary) == "checkpoint: the last step (no evaluation chose a checkpoint)"
    assert "which chose nothing" in final_score_line(summary)


@pytest.mark.parametrize(("eval_size", "why"), [(0, "data.eval_size 0"), (None, "too few records to hold out")])
def test_summary_lines_for_a_run_without_an_eval_split(eval_size, why):
    data, train = DataConfig(train_file="t.jsonl", eval_size=eval_size), TrainConfig()
    summary = describe_splits(data, train, None, None, has_eval=False)
    summary["final_score"]["scores"] = {}
    assert summary["selection"]["split"] is None and summary["final_score"]["split"] is None
    assert summary["selection"]["source"] == f"none ({why}: all of t.jsonl trained)"
    assert selection_line(summary) == "checkpoint: the last step (no evaluation chose a checkpoint)"
    assert final_score_line(summary).startswith("final score: none, no eval or test split scored the adapter")
    with_test = describe_splits(DataConfig(train_file="t.jsonl", eval_size=0, test_file="x.jsonl"), train, None, None,
                                has_eval=False)
    assert with_test["final_score"] == {"split": "test", "source": "x.jsonl", "same_split_as_selection": False}


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        ({"train_file": "a.jsonl", "eval_file": "b.jsonl", "test_file": "./b.jsonl"}, {},
         "data.test_file: given './b.jsonl', the same file as data.eval_file"),
        ({"train_file": "a.jsonl", "test_file": "a.jsonl"}, {}, "the same file as data.train_file"),
        ({"train_file": "a.jsonl", "test_file": "c.jsonl"}, {"fsdp": True, "eval_strategy": "no"},
         "data.test_file: scoring under FSDP is not supported yet"),
        ({"train_file": "a.jsonl", "test_file": 3}, {}, "data.test_file: given 3, expected str or null"),
    ],
)
def test_test_file_problems_name_the_field(tmp_path, data, train, message):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": data, "train": train}))
    with pytest.raises(ConfigError, match="data.test_file") as err:
        load_run_config(path)
    assert message in str(err.value)


def test_a_run_trained_on_a_half_base_is_scored_on_the_fp32_base(toy_files, tmp_path):
    """The final scores are those of the saved adapter as generate and serve run it, on the fp32 base."""
    import dataclasses

    import lorakit
    from lorakit.data.masking import tokenize_dataset
    from lorakit.models import load_causal_lm, load_tokenizer
    from lorakit.train.objectives import CausalLMObjective

    config = _run_config(toy_files, tmp_path, toy_files["test"], None)
    config.train = dataclasses.replace(config.train, half_base="bf16", eval_strategy="no", save_strategy="no")
    summary, lines = _run(config)
    tokenizer = load_tokenizer(toy_files["model"])
    model = load_causal_lm(toy_files["model"])
    lorakit.load_adapter(model, tmp_path / "adapter")
    examples, _ = tokenize_dataset(tokenizer, TEST, "seed", 64)
    with torch.no_grad():
        expected = CausalLMObjective(tokenizer.pad_token_id).evaluate(model.eval(), examples, 4, "cpu")["eval_loss"]
    assert summary["final_score"]["scores"]["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert any("final scores load the saved adapter onto the fp32 base" in line for line in lines)


def test_the_final_line_shows_a_count_as_a_count():
    data, train = DataConfig(train_file="t.jsonl", eval_file="v.jsonl", test_file="x.jsonl"), TrainConfig()
    summary = describe_splits(data, train, 0.5, "checkpoints/step-000010")
    summary["final_score"]["scores"] = {"test_loss": 0.25, "test_exact_match": 0.855, "test_n": 200}
    assert final_score_line(summary).endswith("test_loss 0.2500, test_exact_match 85.5%, test_n 200")


def test_an_evaluation_line_shows_scores_as_the_final_line_does():
    said = []
    eval_printer(said.append, DataConfig(train_file="t.jsonl", eval_file="v.jsonl"))(
        10, {"eval_loss": 0.25, "eval_accuracy": 0.640625, "eval_n": 64})
    assert said == ["step 10 | eval split (v.jsonl): eval_accuracy 64.1%, eval_loss 0.2500, eval_n 64"]
