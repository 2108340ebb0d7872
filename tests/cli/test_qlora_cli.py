"""QLoRA from the command line on a tiny model: 4-bit base, checkpointing, 8-bit paged AdamW; then merge."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lorakit.checkpoint.peft_io import load_adapter
from lorakit.config import QuantizationConfig
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.quant import quantize_model
from lorakit.quant.merge import GAP_PROMPTS, prompt_logits
from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder

pytestmark = pytest.mark.slow  # two lorakit processes: ~40 s on a busy 2-core machine


def lorakit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """`lorakit train --load-in-4bit` with the fourth seed's recipe, 20 steps on the toy task."""
    root = tmp_path_factory.mktemp("qlora-cli")
    model = toy_model_folder(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK * 8))
    config = {
        "model": str(model),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(data), "eval_file": str(data), "max_length": 64},
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": 20,
            "batch_size": 4,
            "lr": 5e-3,
            "warmup_ratio": 0.03,
            "max_grad_norm": 0.3,
            "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": True,
            "eval_strategy": "steps",
            "eval_steps": 10,
            "save_strategy": "no",
            "logging_steps": 10,
            "progress": False,
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        lorakit_cmd("train", str(root / "config.yaml"), "--load-in-4bit"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return model, root / "run", proc


def test_qlora_training_runs_from_the_cli(qlora_run):
    _, run, proc = qlora_run
    assert "quantised linear layers" in proc.stdout and "kernels-community" not in proc.stderr
    assert yaml.safe_load((run / "run_config.yaml").read_text())["quantization"]["bits"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weight_bytes"]["quantized_layers"] == 14
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["eval_loss"] for e in evals if e["kind"] == "eval"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["quantization"]["bits"] == 4


def _gaps(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"max \|logit diff\| ([0-9.e+-]+)", stdout)]


def merge_args(model, run, out, *extra: str) -> list[str]:
    return ["merge", "--model", str(model), "--adapter", str(run / "adapter"), "--output", str(out), *extra]


def test_merge_on_the_4bit_base_reports_the_gap_and_saves_a_plain_model(qlora_run, tmp_path):
    model, run, _ = qlora_run
    out = tmp_path / "merged"
    proc = subprocess.run(
        lorakit_cmd(*merge_args(model, run, out, "--load-in-4bit")),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (dequantised,) = _gaps(proc.stdout)
    assert dequantised <= 1e-4, proc.stdout

    tokenizer = load_tokenizer(model)
    batches = [dict(tokenizer(p, return_tensors="pt", return_token_type_ids=False)) for p in GAP_PROMPTS]
    on_4bit = quantize_model(load_causal_lm(model), QuantizationConfig(bits=4))
    load_adapter(on_4bit, run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no lorakit
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(prompt_logits(on_4bit, batches), prompt_logits(merged, batches))
    )
    assert gap <= 1e-4


def test_base_full_precision_needs_a_quantised_base(qlora_run, tmp_path, capsys):
    from lorakit.cli import main

    model, run, _ = qlora_run
    code = main(merge_args(model, run, tmp_path / "x", "--base-full-precision"))
    assert code == 2 and "add --load-in-4bit or --load-in-8bit" in capsys.readouterr().err
