"""Preference runs end to end on a tiny model: DPO from a trained adapter, ORPO, the cached reference, refusals."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import TOY_TARGETS, TOY_TASK, perturb, toy_model_folder
from lorakit.checkpoint.peft_io import save_adapter
from lorakit.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LoraConfig,
    PreferenceConfig,
    QuantizationConfig,
    RunConfig,
    TrainConfig,
)
from lorakit.data.formats import DataError
from lorakit.lora.inject import inject
from lorakit.models import load_causal_lm
from lorakit.run import run

PAIRS = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": TOY_TASK[(i + 3) % 8]["output"]}
         for i, r in enumerate(TOY_TASK)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(model folder, preference file, instruction test file, a trained-looking adapter folder)."""
    tmp = tmp_path_factory.mktemp("pref")
    folder = toy_model_folder(tmp / "model")
    prefs, test = tmp / "prefs.jsonl", tmp / "test.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    test.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK), encoding="utf-8")
    model = load_causal_lm(str(folder))
    inject(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=TOY_TARGETS))
    perturb(model, std=0.05)
    save_adapter(model, tmp / "start")
    return folder, str(prefs), str(test), str(tmp / "start")


def config(toy, out, **train) -> RunConfig:
    folder, prefs, test, start = toy
    settings = dict(output_dir=str(out), max_steps=4, batch_size=4, lr=2e-3, logging_steps=1, eval_strategy="steps",
                    eval_steps=2, save_strategy="steps", save_steps=2, progress=False)
    return RunConfig(model=str(folder), task="dpo", lora=LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS),
                     data=DataConfig(train_file=prefs, eval_file=prefs, test_file=test),
                     train=TrainConfig(**{**settings, **train}), eval=EvalConfig(task="ros2", max_new_tokens=6))


def events(out, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def test_dpo_from_a_trained_adapter_logs_rewards_and_scores_the_test_split(toy, tmp_path):
    summary = run(config(toy, tmp_path / "dpo", init_adapter=toy[3]), echo=lambda *a: None)
    train = events(tmp_path / "dpo", "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    for key in ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "reward_chosen"):
        assert all(key in e for e in train), key
    # step 1: the policy is its reference (so dropout, 0.3 in the adapter's config, is off)
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert train[-1]["reward_margin"] > 0 and train[-1]["loss"] < train[0]["loss"]
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(events(tmp_path / "dpo", "eval")[0])
    assert summary["final_score"]["split"] == "test" and "test_exact_match" in summary["final_score"]["scores"]
    assert summary["base_label"].startswith("starting adapter")
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_precomputed_reference_is_cached_with_the_run_and_read_back_on_resume(toy, tmp_path, caplog):
    out = tmp_path / "pre"
    first = run(config(toy, out, precompute_reference=True, max_steps=2), echo=lambda *a: None)
    cached = json.loads((out / "reference_logps.json").read_text())
    assert len(cached["train"]) == len(PAIRS) and len(cached["eval"]) == len(PAIRS)
    plain = run(config(toy, tmp_path / "plain", max_steps=2), echo=lambda *a: None)
    assert [e["loss"] for e in events(out, "train")] == pytest.approx([e["loss"] for e in events(tmp_path / "plain",
                                                                                                  "train")], abs=1e-6)
    assert first["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], abs=1e-6)
    with caplog.at_level(logging.INFO, logger="lorakit.train.reference"):
        run(config(toy, out, precompute_reference=True, max_steps=4, resume=True), echo=lambda *a: None)
    assert "read from" in caplog.text
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4]


def test_orpo_trains_without_a_reference(toy, tmp_path):
    run_config = config(toy, tmp_path / "orpo", max_steps=4, batch_size=len(PAIRS), lr=1e-2)
    run_config.task, run_config.preference = "orpo", PreferenceConfig(beta=0.5)
    run(run_config, echo=lambda *a: None)
    train = events(tmp_path / "orpo", "train")
    assert all({"nll_loss", "log_odds_ratio", "reward_accuracy"} <= set(e) for e in train)
    assert train[-1]["loss"] < train[0]["loss"]


def test_dpo_on_a_4bit_base_keeps_one_quantised_model_as_policy_and_reference(toy, tmp_path):
    run_config = config(toy, tmp_path / "qdpo", max_steps=2, eval_strategy="no", save_strategy="no")
    run_config.quantization = QuantizationConfig(bits=4)
    summary = run(run_config, echo=lambda *a: None)
    train = events(tmp_path / "qdpo", "train")
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # a new adapter starts as the base
    assert summary["weight_bytes"]["linear_ratio"] < 0.5 and all(e["loss"] == e["loss"] for e in train)


@pytest.mark.parametrize(("change", "message"), [
    (dict(data=DataConfig(packing=True)), "data.packing: task dpo compares"),
    (dict(train=TrainConfig(max_tokens_per_forward=512)), "train.max_tokens_per_forward: task dpo keeps"),
    (dict(task="orpo", train=TrainConfig(precompute_reference=True)), "train.precompute_reference: orpo needs"),
    (dict(task="causal_lm", train=TrainConfig(precompute_reference=True)), "task causal_lm has no reference"),
    (dict(preference=PreferenceConfig(loss_type="hinge")), "preference.loss_type: given 'hinge', expected one of"),
    (dict(preference=PreferenceConfig(beta=0)), "preference.beta: given 0, expected a positive number"),
])
def test_what_the_preference_objectives_cannot_do_is_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{"task": "dpo", **change})


def test_a_data_set_of_the_wrong_kind_is_one_line_for_either_task(toy, tmp_path):
    folder, prefs, test, _ = toy
    with pytest.raises(DataError, match="holds instruction records; task dpo and orpo train on preference records"):
        run(RunConfig(model=str(folder), task="dpo", data=DataConfig(train_file=test),
                      train=TrainConfig(output_dir=str(tmp_path / "a"), progress=False)), echo=lambda *a: None)
    with pytest.raises(DataError, match="holds preference records .* which train with task dpo or orpo"):
        run(RunConfig(model=str(folder), data=DataConfig(train_file=prefs),
                      train=TrainConfig(output_dir=str(tmp_path / "b"), progress=False)), echo=lambda *a: None)


def test_the_example_configs_load():
    from pathlib import Path

    from lorakit.config_loading import load_run_config

    examples = Path(__file__).resolve().parents[2] / "examples" / "ros2"
    dpo = load_run_config(examples / "dpo.yaml")
    assert (dpo.task, dpo.train.init_adapter, dpo.data.template) == ("dpo", "runs/ros2-demo/adapter", "seed")
    assert load_run_config(examples / "chat.yaml").data.template == "chat"
