"""What a run folder already holds, so that a new run never writes over an earlier one unasked.

A fresh run into a folder holding a finished run (summary.json), a trained adapter (adapter/) or checkpoints is
refused before anything loads, naming the ways on: `--resume` continues the checkpoints, another output_dir keeps
them, `train.overwrite_output_dir: true` replaces them (they are removed when training begins, not before, so a
run that fails while loading still leaves them). The logs of a run that failed before any of those were written
do not count: re-running the same command after fixing its data is the common case.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.checkpoint.resume import list_checkpoints
from lorakit.config import ConfigError, TrainConfig

ADAPTER_FOLDER, SUMMARY_NAME = "adapter", "summary.json"


def held(run_dir: str | Path) -> list[str]:
    """What of an earlier run `run_dir` holds, as phrases: a finished run, a trained adapter, checkpoints."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / SUMMARY_NAME).is_file():
        found.append(f"a finished run ({SUMMARY_NAME})")
    if (run_dir / ADAPTER_FOLDER).is_dir() and any((run_dir / ADAPTER_FOLDER).iterdir()):
        found.append(f"a trained adapter ({ADAPTER_FOLDER}/)")
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        found.append(f"checkpoints (the newest {checkpoints[-1].name})")
    return found


def check_output_dir(train: TrainConfig) -> None:
    """ConfigError where this run would write over an earlier one in train.output_dir without being asked to:
    a fresh run into a folder `held` finds anything in; or where a resumed one finds no checkpoint to continue; or
    where a file stands in the place of the run's checkpoints or adapter folder."""
    for name in ("checkpoints", ADAPTER_FOLDER):
        if (Path(train.output_dir) / name).exists() and not (Path(train.output_dir) / name).is_dir():
            raise ConfigError(f"train.output_dir: {Path(train.output_dir) / name} is a file where the run keeps its "
                              f"{name} folder; move it away or choose another train.output_dir")
    if train.overwrite_output_dir:
        return
    if train.resume and not list_checkpoints(train.output_dir):  # as transformers' Trainer: a resume that would
        # quietly start afresh (a misspelt output_dir) is refused
        raise ConfigError(f"train.resume: {train.output_dir} holds no checkpoint to continue "
                          f"({Path(train.output_dir) / 'checkpoints'} has none); train without --resume to start it")
    found = held(train.output_dir)
    resumable = any(phrase.startswith("checkpoints") for phrase in found)
    if not found or (train.resume and resumable):
        return
    ways = ["--resume continues its checkpoints"] if resumable else []
    ways += ["another train.output_dir keeps it", "train.overwrite_output_dir: true replaces it"]
    raise ConfigError(f"train.output_dir: {train.output_dir} holds {' and '.join(found)}; {', '.join(ways)}")


def clear_earlier_run(run_dir: str | Path) -> None:
    """Remove an earlier run's results and checkpoints (train.overwrite_output_dir, as training begins)."""
    run_dir = Path(run_dir)
    # its results, and the files a page or a tracker would read as this run's: its samples, curves, tracker runs
    for name in (SUMMARY_NAME, "samples.jsonl", "curves.png", "trackers.json"):
        (run_dir / name).unlink(missing_ok=True)
    for folder in (run_dir / ADAPTER_FOLDER, run_dir / "checkpoints"):
        if folder.is_dir():
            shutil.rmtree(folder)
