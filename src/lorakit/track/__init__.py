"""Experiment trackers: metrics.jsonl always, and TensorBoard, MLflow or W&B as `train.report_to` asks.

Each tracker is one module here holding a class with the same five methods (`log_config`,
`log_metrics`, `log_samples`, `log_adapter`, `close`); `RunLog` (runlog.py) is the one object a
run writes through. The names below are the choices of `train.report_to`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.atomic_files import write_atomically


@dataclass(frozen=True)
class TrackerSpec:
    module: str  # lorakit.track.<module>, holding class Tracker
    package: str  # the import the tracker needs
    pip: str  # what to install for it
    help: str


TRACKERS = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", "tensorboard",
                               "event files in <run>/tensorboard (torch.utils.tensorboard)"),
    "mlflow": TrackerSpec("mlflow", "mlflow", "mlflow",
                          "an MLflow run in <run>/mlruns, or at $MLFLOW_TRACKING_URI"),
    "wandb": TrackerSpec("wandb", "wandb", "wandb",
                         "a W&B run in <run>/wandb, offline unless you are logged in"),
}


def requested(report_to: list[str] | str | None) -> list[str]:
    """The trackers `train.report_to` names, in order and once each (jsonl is always on; 'none' adds nothing)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return list(dict.fromkeys(n for n in names if n in TRACKERS))


def missing(names: list[str]) -> list[str]:
    """One line per tracker whose package is not installed, with the pip command that installs it."""
    return [
        f"train.report_to: {name} needs the '{TRACKERS[name].package}' package; pip install {TRACKERS[name].pip}"
        for name in names
        if importlib.util.find_spec(TRACKERS[name].package) is None
    ]


def open_tracker(name: str, run_dir: Path, resume_step: int | None):
    """A started tracker for the run in `run_dir` (continuing its earlier tracker run when resuming)."""
    module = importlib.import_module(f"lorakit.track.{TRACKERS[name].module}")
    return module.Tracker(run_dir, resume_step)


IDS_FILE = "trackers.json"  # each tracker's run id, so a resumed run continues the same tracker run


def remembered_id(run_dir: Path, name: str) -> str | None:
    import json

    path = Path(run_dir) / IDS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def remember_id(run_dir: Path, name: str, run_id: str) -> None:
    import json

    path = Path(run_dir) / IDS_FILE
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    ids[name] = run_id
    write_atomically(path, json.dumps(ids, indent=1) + "\n")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists and None stay values (trackers print them), and so does a mapping
    whose keys are data rather than names (lora.rank_pattern's regular expressions such as 'q_proj$', which no
    tracker takes as a name)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) and _NAME.fullmatch(k) for k in value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # a config key: what MLflow, TensorBoard and W&B all take in a name


def metric_values(event: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl event under tracker names: train/loss, eval/loss, eval/exact_match, ...

    The event's kind becomes the prefix ('eval_loss' of an eval event is 'eval/loss'); strings,
    lists (a confusion matrix) and the step itself are left out.
    """
    kind = str(event.get("kind", "event"))
    return {
        f"{kind}/{key.removeprefix(kind + '_')}": float(value)
        for key, value in event.items()
        if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
