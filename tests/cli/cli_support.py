"""Helpers for driving the `lorakit` CLI in tests: a toy run config, in-process and real-process
invocations, and fingerprints proving that bad input left an earlier run's outputs as they were.

In-process calls (`cli`) take the same code path as `python -m lorakit` without a fresh
interpreter per case (subprocess start-up costs seconds on a loaded machine); `lorakit_process`
is for what needs a real process (signals, resource limits, dropped capabilities).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from conftest import CHAT_TEMPLATE, TOY_TARGETS, TOY_TASK, toy_model_folder
from lorakit.checkpoint.manifest import manifest_problem
from lorakit.checkpoint.resume import list_checkpoints
from lorakit.cli import main

GOOD_LINES = "".join(json.dumps(r) + "\n" for r in TOY_TASK)


def toy_run_config(root: Path, *, model: str | None = None) -> dict:
    """A tiny model folder under `root` (unless `model` is given) and a short run on TOY_TASK (no output_dir)."""
    (root / "train.jsonl").write_text(GOOD_LINES)
    return {
        "model": model or str(toy_model_folder(root / "model")),
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(root / "train.jsonl"), "eval_size": 2, "max_length": 64},
        "train": {
            "max_steps": 4, "batch_size": 4, "lr": 1e-3, "eval_strategy": "no", "save_strategy": "steps",
            "save_steps": 2, "save_total_limit": 3, "progress": False,
        },
    }


def with_chat_template(folder: Path) -> Path:
    """Give a saved toy model folder's tokenizer CHAT_TEMPLATE; returns the folder."""
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_config(path: Path, config: dict, **sections) -> Path:
    """`config` with each section's keys updated from `sections` (a section may be None: dropped), as YAML."""
    merged = {k: ({**v, **sections.get(k, {})} if isinstance(v, dict) else v) for k, v in config.items()}
    merged.update({k: v for k, v in sections.items() if k not in merged})
    path.write_text(yaml.safe_dump(merged))
    return path


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run `lorakit ARGV` in-process; return its exit code and its stderr lines from lorakit
    (argparse's usage errors included: they exit through SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("lorakit")]


def lorakit_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


def fingerprint(run: Path) -> dict[str, str]:
    """sha256 of every file under the run's checkpoints/ and adapter/."""
    files = [p for sub in ("checkpoints", "adapter") for p in sorted((run / sub).rglob("*")) if p.is_file()]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def tree_fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (a folder a command must not change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_intact(run: Path, before: dict[str, str]) -> None:
    """The toy run's two checkpoints and adapter are byte for byte what they were, and whole."""
    assert fingerprint(run) == before
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]
    assert all(manifest_problem(p) is None for p in list_checkpoints(run))
