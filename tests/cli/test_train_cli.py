"""`lorakit train` end to end on a tiny model: a real process, killed and resumed; config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder


def lorakit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny model folder, data files and a config that checkpoints every 10 steps."""
    root = tmp_path_factory.mktemp("toy")
    model = toy_model_folder(root / "model")
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK * 8))
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK))
    config = {
        "model": str(model),
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file), "max_length": 64},
        "train": {
            "max_steps": 300, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.1, "eval_strategy": "steps",
            "eval_steps": 10, "save_strategy": "steps", "save_steps": 10, "save_total_limit": 3, "progress": False,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _final_eval_loss(run_dir: Path) -> float:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == list(range(10, 301, 10))  # each eval logged once, resumed or not
    return evals[-1]["eval_loss"]


def test_a_killed_run_resumes_to_the_same_result(toy_run, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(lorakit_cmd("train", str(toy_run), "--train.output_dir", str(whole)), check=True)

    proc = subprocess.Popen(lorakit_cmd("train", str(toy_run), "--train.output_dir", str(broken)))
    second = broken / "checkpoints" / "step-000020"
    deadline = time.time() + 120
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert second.exists() and not (broken / "adapter").exists(), "the run was not stopped mid-way"

    subprocess.run(lorakit_cmd("train", str(toy_run), "--train.output_dir", str(broken), "--resume"), check=True)
    assert abs(_final_eval_loss(broken) - _final_eval_loss(whole)) <= 1e-4
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert len(list((broken / "checkpoints").iterdir())) <= 3  # save_total_limit, the best included


@pytest.mark.parametrize(
    "override, message",
    [
        (["--train.lr", "fast"], "train.lr: given 'fast', expected float"),
        (["--train.schedulr", "cosine"], "train.schedulr: unknown key (did you mean 'scheduler'?)"),
        (["--lora.r", "0"], "lora.r: given 0, expected a positive integer"),
        (["--lora.target_modules", "[qq_proj]"], "matched no module of LlamaForCausalLM; closest names it has: q_proj"),
    ],
)
def test_config_errors_are_one_clear_line(toy_run, tmp_path, override, message):
    proc = subprocess.run(
        lorakit_cmd("train", str(toy_run), "--train.output_dir", str(tmp_path / "run"), *override),
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
