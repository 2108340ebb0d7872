"""Checkpoints during a run: when evaluation and saving are due, which checkpoint is best, resuming.

`RunCheckpoints` owns the run's best metric and best checkpoint: it resumes them from the latest
good checkpoint, updates them at each save, writes checkpoints (rank 0, atomically, through
checkpoint/resume.py) and, at the end, loads the best adapter back into the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.checkpoint.peft_io import restore_adapter_weights
from lorakit.checkpoint.resume import (
    checkpoint_dir,
    latest_good_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lorakit.config import TrainConfig
from lorakit.train.distributed import DataParallel, World, barrier
from lorakit.train.sampling import Batches, check_position

log = logging.getLogger(__name__)


def due(strategy: str, every: int, step: int, epoch_end: bool, out_of_time: bool) -> bool:
    """Whether an eval or save with this strategy ("no", "steps" every N, "epoch") falls on `step`.

    A run stopped by its time budget evaluates and saves its last step under "steps", so keep-best sees it.
    """
    if strategy == "steps":
        return step % every == 0 or out_of_time
    return strategy == "epoch" and epoch_end


def greater_is_better(config: TrainConfig) -> bool:
    """`train.greater_is_better`, or inferred from the metric's name (losses and perplexities fall)."""
    if config.greater_is_better is not None:
        return config.greater_is_better
    return not any(word in config.metric_for_best for word in ("loss", "perplexity"))


@dataclass
class RunCheckpoints:
    out: Path
    config: TrainConfig
    adapter: str
    parallel: DataParallel
    world: World
    batches: Batches
    scaler: object = None  # the fp16 GradScaler, whose state travels with the checkpoint
    run_state: dict | None = None  # extra entries for the checkpoint's state (the run's config, labels)
    best: float | None = None
    best_path: Path | None = None

    def resume(self, model: nn.Module, optimizer, scheduler) -> tuple[int, dict]:
        """With `train.resume`, load the latest good checkpoint; returns (its step, its state), else (0, {})."""
        path = latest_good_checkpoint(self.out) if self.config.resume else None
        if path is None:
            return 0, {}
        with self.parallel.full_params(writeback=True):
            state = load_checkpoint(path, model, self.adapter, optimizer, scheduler, self.scaler)
        check_position(state, self.batches, path)
        self.best = state.get("best_metric")
        self.best_path = Path(state["best_checkpoint"]) if state.get("best_checkpoint") else None
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"], state

    def save(self, step: int, result: dict | None, model: nn.Module, optimizer, scheduler, guard) -> None:
        """Checkpoint `step` (its eval `result` may make it the best), then prune old checkpoints."""
        path = checkpoint_dir(self.out, step)
        value = (result or {}).get(self.config.metric_for_best)
        if value is not None and (
            self.best is None or (value > self.best if greater_is_better(self.config) else value < self.best)
        ):
            self.best, self.best_path = value, path
        state = {
            "best_metric": self.best, "best_checkpoint": str(self.best_path) if self.best_path else None,
            "guard": guard.state_dict(), **(self.run_state or {}),
            "global_batch": self.batches.global_batch, "processes": self.world.size,
        }
        with self.parallel.full_params():
            if self.world.main:
                save_checkpoint(self.out, step, model, self.adapter, optimizer, scheduler, state, self.scaler)
                prune_checkpoints(self.out, self.config.save_total_limit, {p for p in (self.best_path, path) if p})
        barrier()
        guard.remember(step, model, optimizer, scheduler)

    def restore_best(self, model: nn.Module) -> None:
        """Keep-best: load the best checkpoint's adapter weights back into the model (if there is one)."""
        if self.best_path is not None:
            with self.parallel.full_params(writeback=True):
                restore_adapter_weights(model, self.adapter, self.best_path)
