"""Small data sets and runs without evaluation, end to end through `lorakit train` (the one-record
cases through `python -m lorakit`, the others in-process):
one record, data.eval_size 0 on a chat file, an eval set smaller than a batch, packing with one
example, and a classifier on a handful of rows. Each either trains (saying what it decided in one
line) or refuses in one line with exit code 2, leaving an earlier run's outputs as they were.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from cli_support import fingerprint, lorakit_process, toy_run_config, with_chat_template, write_config
from conftest import TOY_TASK
from lorakit.cli import main

ONE = json.dumps(TOY_TASK[0]) + "\n"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """The toy run config, its model's tokenizer given a chat template, without eval settings."""
    config = toy_run_config(tmp_path_factory.mktemp("small-data"))
    with_chat_template(Path(config["model"]))
    config["data"].pop("eval_size")
    config["train"].update(max_steps=2, save_steps=1, logging_steps=1)
    return config


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_record_run(toy, tmp_path_factory):
    """`python -m lorakit train` on a one-record file with no eval settings: (run folder, config, stderr)."""
    root = tmp_path_factory.mktemp("one")
    (root / "one.jsonl").write_text(ONE)
    config = write_config(root / "config.yaml", toy, data={"train_file": str(root / "one.jsonl")},
                          train={"output_dir": str(root / "run")})
    proc = subprocess.run(lorakit_process("train", str(config)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root / "run", config, proc.stderr


def test_one_record_trains_on_it_without_evaluation_and_says_so_in_one_line(one_record_run):
    run, config, stderr = one_record_run
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    held = [line for line in stderr.splitlines() if "too few to hold out an eval split" in line]
    assert len(held) == 1 and held[0].startswith("WARNING ") and "one.jsonl: only 1 training record," in held[0]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"]["split"] is None and summary["final_score"]["split"] is None
    assert summary["steps"] == 2 and not [e for e in _events(run) if e["kind"] == "eval"]


def test_one_record_with_an_explicit_eval_size_is_refused_and_the_earlier_run_kept(one_record_run):
    run, config, _ = one_record_run
    before = fingerprint(run)
    assert before  # the checkpoints and adapter of the run above
    proc = subprocess.run(lorakit_process("train", str(config), "--data.eval_size", "0.1", "--resume"),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("lorakit train: error: ") and lines[0].endswith(
        "one.jsonl: data.eval_size 0.1 holds out 1 of its 1 record and leaves none to train on; expected a smaller "
        "data.eval_size, 0 to train on all of them without evaluation, or a separate data.eval_file")
    assert fingerprint(run) == before


@pytest.mark.parametrize("sharegpt", [False, True])
def test_eval_size_zero_on_a_chat_file_trains_on_every_record(toy, tmp_path, capsys, sharegpt):
    chat = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in TOY_TASK]
    if sharegpt:
        chat = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                   for m in r["messages"]]} for r in chat]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    config = write_config(tmp_path / "config.yaml", toy, data={"train_file": str(tmp_path / "chat.jsonl"), "eval_size": 0},
                          train={"output_dir": str(tmp_path / "run"), "eval_strategy": "steps", "eval_steps": 1})
    code = main(["train", str(config)])
    out = capsys.readouterr().out
    assert code == 0 and "data: 8 train / no eval examples; 0 truncated, 0 dropped" in out
    assert "final score: none, no eval or test split scored the adapter" in out
    assert not [e for e in _events(tmp_path / "run") if e["kind"] == "eval"]
    # conversations train through the chat template whatever data.template says (seed by default): the run card,
    # which generate, serve and export prompt the adapter with, names it
    assert json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())["template"] == "chat"


def test_an_eval_set_smaller_than_a_batch_is_evaluated_whole(toy, tmp_path, capsys):
    (tmp_path / "eval.jsonl").write_text(ONE)
    config = write_config(tmp_path / "config.yaml", toy, data={"eval_file": str(tmp_path / "eval.jsonl")},
                          train={"output_dir": str(tmp_path / "run"), "eval_strategy": "steps", "eval_steps": 1,
                                 "batch_size": 4})
    assert main(["train", str(config)]) == 0
    evals = [e["eval_loss"] for e in _events(tmp_path / "run") if e["kind"] == "eval"]
    assert len(evals) == 2 and all(math.isfinite(v) and v > 0 for v in evals)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selection"]["value"] == min(evals)


def test_packing_with_one_example_trains(toy, tmp_path):
    (tmp_path / "one.jsonl").write_text(ONE)
    config = write_config(tmp_path / "config.yaml", toy,
                          data={"train_file": str(tmp_path / "one.jsonl"), "eval_size": 0, "packing": True},
                          train={"output_dir": str(tmp_path / "run")})
    assert main(["train", str(config)]) == 0
    losses = [e["loss"] for e in _events(tmp_path / "run") if e["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


def test_a_classifier_on_four_rows_trains_on_all_of_them(toy, tmp_path, capsys):
    rows = [{"text": f"{w} film", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "poor"])]
    rows[0]["text"] = "good " * 300 + "film"  # beyond max_length: cut, and counted
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "config.yaml", toy, task="seq_cls", data={"train_file": str(tmp_path / "train.jsonl")},
                          lora={"target_modules": ["q_proj", "v_proj"]}, train={"output_dir": str(tmp_path / "run")})
    code = main(["train", str(config)])
    out = capsys.readouterr().out
    assert code == 0 and "data: 4 train / no eval examples; 1 truncated at max_length 64; labels: 0, 1" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_score"]["split"] is None


def test_a_qlora_classifier_is_classified_on_the_base_it_was_trained_on(toy, tmp_path, capsys):
    """Its run card records the 4-bit base, and loading it for classify rebuilds that base (fp4, no double quant)."""
    from lorakit.infer.load import load_classifier
    from lorakit.quant.bnb import is_quantized

    rows = [{"text": f"{w} film", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "poor"])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "config.yaml", toy, task="seq_cls", data={"train_file": str(tmp_path / "train.jsonl")},
                          lora={"target_modules": ["q_proj", "v_proj"]}, train={"output_dir": str(tmp_path / "run")},
                          quantization={"bits": 4, "type": "fp4", "double_quant": False})
    assert main(["train", str(config)]) == 0
    card = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())
    assert card["quantization"]["type"] == "fp4" and card["quantization"]["double_quant"] is False
    model, _, _, _ = load_classifier(toy["model"], str(tmp_path / "run" / "adapter"))
    quantised = [m for m in model.modules() if is_quantized(m)]
    assert quantised and {m.weight.quant_type for m in quantised} == {"fp4"}
