"""Checkpoints during a run: when evaluation and saving are due, which checkpoint is best, resuming.

`RunCheckpoints` owns the run's best metric and best checkpoint: it resumes them from the latest
good checkpoint, updates them at each save, writes checkpoints (rank 0, atomically, through
checkpoint/resume.py) and, at the end, loads the best adapter back into the model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.checkpoint.peft_io import restore_adapter_weights
from lorakit.checkpoint.manifest import file_digest, manifest_problem
from lorakit.checkpoint.resume import (
    checkpoint_dir,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lorakit.config import ConfigError, TrainConfig
from lorakit.train.distributed import DataParallel, World, barrier
from lorakit.train.sampling import Batches, check_position

log = logging.getLogger(__name__)


# What decides a run's course from a checkpoint on: resuming with another value of any of these would go on as another
# run from this one's weights, optimizer and data position (a changed lr would even be dropped for the saved one). The
# length (max_steps, epochs), evaluation, saving and logging may change; the batch is checked on its own
# (sampling.check_position) and the adapter's shape when its weights load.
RESUME_SETTINGS = {
    "": ("model", "task"),
    "lora": ("lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "modules_to_save", "alpha_pattern"),
    "data": ("hf_dataset", "format", "template", "train_on", "max_length", "eval_size", "text_column",
             "text_pair_column", "label_column", "label_names", "packing", "pack_length", "max_train_examples"),
    "train": ("lr", "weight_decay", "warmup_ratio", "scheduler", "max_grad_norm", "optimizer", "loraplus_lr_ratio",
              "seed", "group_by_length", "precision", "init_adapter"),
}


def resume_settings(run_config: dict) -> dict:
    """{dotted key: value} of RESUME_SETTINGS from a run config as `config.to_dict` gives it (keys it lacks left out),
    and the SHA-256 of data.train_file's contents: an edited file is another run's data, a moved one is not."""
    found = {}
    for section, keys in RESUME_SETTINGS.items():
        values = run_config.get(section, {}) if section else run_config
        found.update({f"{section}.{key}" if section else key: values[key] for key in keys
                      if isinstance(values, dict) and key in values})
    train_file = (run_config.get("data") or {}).get("train_file")
    if train_file and Path(train_file).is_file():
        found["data.train_file contents (sha256)"] = file_digest(Path(train_file))
    return found


def selection_settings(run_config: dict) -> dict:
    """What a run's best metric is measured and compared by: the metric, its direction and the eval split (its
    file's SHA-256, or the hold-out and its limit). A resume that changes any of them starts keep-best afresh."""
    train, data = run_config.get("train") or {}, run_config.get("data") or {}
    found = {f"train.{k}": train.get(k) for k in ("metric_for_best", "greater_is_better")}
    found.update({f"data.{k}": data.get(k) for k in ("eval_file", "eval_size", "max_eval_examples")})
    eval_file = data.get("eval_file")
    if eval_file and Path(eval_file).is_file():
        found["data.eval_file"] = file_digest(Path(eval_file))  # its contents, wherever it lies
    return found


def check_settings(state: dict, settings: dict | None, checkpoint: Path) -> None:
    """ConfigError naming the first setting this run gives otherwise than the run that wrote `checkpoint`."""
    saved = state.get("settings")
    if not isinstance(saved, dict) or not settings:  # a checkpoint written before settings were kept
        return
    for key, value in json.loads(json.dumps(settings, default=str)).items():  # as the checkpoint's JSON holds them
        if key in saved and saved[key] != value and not _same_folder(saved[key], value):
            raise ConfigError(f"{checkpoint}: written with {key} {saved[key]!r}, but this run gives {value!r}; resume "
                              "with the run's own settings, or train into another output_dir")


def _same_folder(a, b) -> bool:
    """Two spellings of one existing folder (a model given by another relative or absolute path)."""
    return isinstance(a, str) and isinstance(b, str) and Path(a).is_dir() and Path(b).is_dir() and (
        Path(a).resolve() == Path(b).resolve())


def due(strategy: str, every: int, step: int, epoch_end: bool, out_of_time: bool) -> bool:
    """Whether an eval or save with this strategy ("no", "steps" every N, "epoch") falls on `step`.

    A run stopped by its time budget evaluates and saves its last step under "steps", so keep-best sees it.
    """
    if strategy == "steps":
        return step % every == 0 or out_of_time
    return strategy == "epoch" and epoch_end


def unevaluated_saves(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> tuple[list[int], int]:
    """The steps a run saves without evaluating them, which keep-best cannot weigh (save_steps 3 with eval_steps 5),
    and how many saved steps it can weigh (the last among them when it is evaluated, as it is then always saved);
    both empty without an evaluation schedule or checkpoints."""
    if "no" in (config.eval_strategy, config.save_strategy):
        return [], 0
    unweighed, weighed = [], 0
    for step in range(1, total_steps + 1):
        epoch_end = step % steps_per_epoch == 0 or step == total_steps
        evaluated = due(config.eval_strategy, config.eval_steps, step, epoch_end, False)
        if evaluated and (step == total_steps or due(config.save_strategy, config.save_steps, step, epoch_end, False)):
            weighed += 1
        elif not evaluated and due(config.save_strategy, config.save_steps, step, epoch_end, False):
            unweighed.append(step)
    return unweighed, weighed


def improves(value, best: float | None, greater: bool) -> bool:
    """Whether an evaluation's `value` of the best metric beats `best` (None: nothing chosen yet). A value that is no
    finite number (a NaN eval loss of a diverging step) never does: a NaN chosen first would never be beaten."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return best is None or (value > best if greater else value < best)


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
    metric_missing: bool = False  # train.metric_for_best was not among an evaluation's metrics

    def resume(self, model: nn.Module, optimizer, scheduler) -> tuple[int, dict]:
        """With `train.resume`, load the latest good checkpoint; returns (its step, its state), else (0, {}) where the
        run has no checkpoint yet. Checkpoints of which none checks out are a ConfigError: resuming would start
        afresh over them."""
        path = latest_good_checkpoint(self.out) if self.config.resume else None
        if path is None:
            damaged = list_checkpoints(self.out) if self.config.resume else []
            if damaged:
                newest = damaged[-1]
                raise ConfigError(f"train.resume: no checkpoint in {newest.parent} checks out (the newest, "
                                  f"{newest.name}: {manifest_problem(newest)}); move them away to start afresh here")
            return 0, {}
        with self.parallel.full_params(writeback=True):
            state = load_checkpoint(path, model, self.adapter, optimizer, scheduler, self.scaler)
        check_position(state, self.batches, path)
        check_settings(state, (self.run_state or {}).get("settings"), path)
        self.best = state.get("best_metric")
        self.best_path = self._kept_best(state.get("best_checkpoint"))
        self._check_selection(state.get("selection"))
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"], state

    def _kept_best(self, saved: str | None) -> Path | None:
        """The best checkpoint a resumed state names, in this run folder (a state names it by its folder's name; one
        written before, by its path then: its name is taken, so a moved or copied run finds its own). A best
        checkpoint no longer there, or damaged, is dropped, and keep-best chooses among those saved from here on."""
        if not saved:
            return None
        path = checkpoint_dir(self.out, 0).with_name(Path(saved).name)
        problem = manifest_problem(path) if path.is_dir() else "not found"
        if problem is not None:
            log.warning("the best checkpoint so far, %s, cannot be used (%s); keep-best chooses among the checkpoints "
                        "from here on", path, problem)
            self.best = None
            return None
        return path

    def _check_selection(self, saved) -> None:
        """Drop the kept best when it was measured otherwise than this run measures (another eval split, metric or
        direction): its value cannot be compared with this run's."""
        now = json.loads(json.dumps((self.run_state or {}).get("selection"), default=str))
        if self.best_path is None or not isinstance(saved, dict) or not now:
            return
        changed = next((k for k in now if k in saved and saved[k] != now[k]), None)
        if changed is not None:
            log.warning("the best checkpoint so far, %s, was chosen with %s %r, but this run gives %r; keep-best "
                        "chooses among the checkpoints from here on", self.best_path.name, changed, saved[changed],
                        now[changed])
            self.best, self.best_path = None, None

    def save(self, step: int, result: dict | None, model: nn.Module, optimizer, scheduler, guard) -> None:
        """Checkpoint `step` (its eval `result` may make it the best), then prune old checkpoints."""
        path = checkpoint_dir(self.out, step)
        if result and self.config.metric_for_best not in result and not self.metric_missing:
            self.metric_missing = True  # said once a run
            log.warning("train.metric_for_best %r is not among the eval metrics (%s); keep-best chooses nothing",
                        self.config.metric_for_best, ", ".join(sorted(k for k in result if k.startswith("eval_"))))
        value = (result or {}).get(self.config.metric_for_best)
        if improves(value, self.best, greater_is_better(self.config)):
            self.best, self.best_path = value, path
        state = {
            "best_metric": self.best, "best_checkpoint": self.best_path.name if self.best_path else None,
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
