"""What the dashboard tests share: run folders from tiny real training runs (made once per test session),
copies of them, and the app served by uvicorn on a free loopback port in 18500-18599."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
import yaml

from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder
from lorakit.config_loading import load_run_config
from lorakit.dashboard.app import build_app
from lorakit.dashboard.config import DashboardConfig
from lorakit.run import run

PORTS = range(18500, 18600)
# Two adapters on the toy task, 40 steps each: rank 8 learns it (8/8 exact here), rank 4 in part (3/8).
TRAINED = {
    "toy-r8": ["--lora.r", "8", "--lora.lora_alpha", "16"],
    "toy-r4": ["--lora.r", "4", "--lora.lora_alpha", "8"],
}
_built: dict[Path, Path] = {}


def trained_runs(base: Path) -> Path:
    """A runs folder holding the TRAINED runs (real `lorakit.run` on a tiny model), built once per session."""
    if base in _built:
        return _built[base]
    root = base / "dashboard-trained"
    model = toy_model_folder(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK * 4))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK))
    config = {
        "model": str(model),
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "eval.jsonl"), "max_length": 64},
        "train": {"max_steps": 40, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.1, "logging_steps": 1, "eval_strategy": "steps",
                  "eval_steps": 8, "save_strategy": "steps", "save_steps": 8, "progress": False},
        "eval": {"task": "ros2", "max_new_tokens": 8, "batch_size": 8},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    runs = root / "runs"
    for name, overrides in TRAINED.items():
        run(load_run_config(root / "config.yaml", ["--train.output_dir", str(runs / name), *overrides]),
            echo=lambda *a, **k: None)
    _built[base] = runs
    return runs


def copy_run(source: Path, target: Path, lr: float | None = None, rank: int | None = None, loss_scale: float = 1.0,
             with_heavy: bool = False) -> Path:
    """A copy of a real run folder with its lr/rank changed and its losses scaled (checkpoints and adapter
    left out unless `with_heavy`): what a sweep's folders look like, without training each."""
    ignore = None if with_heavy else shutil.ignore_patterns("checkpoints", "adapter", "tensorboard", "mlruns", "wandb")
    shutil.copytree(source, target, ignore=ignore)
    config = yaml.safe_load((target / "run_config.yaml").read_text())
    config["train"]["output_dir"] = str(target)
    if lr is not None:
        config["train"]["lr"] = lr
    if rank is not None:
        config["lora"]["r"] = rank
    (target / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    events = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    for e in events:
        for key in ("loss", "eval_loss"):
            if key in e:
                e[key] *= loss_scale
    (target / "metrics.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
    return target


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free_port() -> int:
    for port in random.sample(list(PORTS), len(PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18500-18599")


@contextlib.contextmanager
def serving(runs_dir: Path, config: DashboardConfig | None = None):
    """The dashboard for `runs_dir` on http://127.0.0.1:PORT (yields that base URL); stopped afterwards."""
    config = config or DashboardConfig(port=free_port())
    server = uvicorn.Server(uvicorn.Config(build_app(runs_dir, config), host="127.0.0.1", port=config.port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the dashboard did not start"
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
