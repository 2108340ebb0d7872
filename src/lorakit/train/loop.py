"""The training loop: fetch, forward, backward, step, log, evaluate, save. One loop for every run."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.allocator import release_free_memory
from lorakit.checkpoint.peft_io import save_adapter
from lorakit.config import ConfigError, TrainConfig
from lorakit.data.collate import split_rows
from lorakit.models import DTYPES
from lorakit.process_memory import peak_memory
from lorakit.track.runlog import RunLog
from lorakit.train.checkpoints import RunCheckpoints, due, unevaluated_saves
from lorakit.train.distributed import DataParallel, World, barrier, current_world, grad_accum_for, shard
from lorakit.train.guard import DivergenceError, DivergenceGuard
from lorakit.train.lean import release_freed_memory, use_fused_paths
from lorakit.train.optim import build_optimizer, build_scheduler
from lorakit.train.sampling import Batches, epoch_order  # noqa: F401  (epoch_order: re-exported)

log = logging.getLogger(__name__)
ADAPTER = "default"


@dataclass
class TrainResult:
    steps: int
    final_eval: dict
    best_metric: float | None
    best_checkpoint: str | None
    adapter_dir: str
    seconds: float
    history: list[dict] = field(default_factory=list)
    lean_path: dict = field(default_factory=dict)  # what use_fused_paths applied, e.g. the half type auto chose
    peak_memory: dict = field(default_factory=dict)  # this process's peak MB up to here (lorakit/process_memory.py)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], float]],
    objective,
    precision: Precision | None = None,
    parallel: DataParallel | None = None,
    max_tokens: int = 0,
) -> float:
    """Backpropagate one optimizer step's micro-batches; return the step's mean token loss.

    Each micro-batch's loss sum is divided by the label count of the whole window, so the
    gradient equals that of one big batch, however the tokens fall into micro-batches. Across
    processes the window is the global batch: the count is all-reduced, and each loss is
    multiplied by the process count because DDP averages the processes' gradients. A
    (batch, weight) pair with weight 0 is a stand-in that only keeps the processes in step.
    With `max_tokens`, each micro-batch runs through the model in row groups of at most that
    many tokens (same gradient, a fraction of the activation memory).
    """
    precision = precision or Precision()
    parallel = parallel or DataParallel(model, objective, World())
    pairs = [b if isinstance(b, tuple) else (b, 1.0) for b in micro_batches]
    (count,) = parallel.sum(sum(objective.count(b) * w for b, w in pairs))
    scale = parallel.world.size / max(count, 1)
    total = 0.0
    pieces = [(piece, weight) for batch, weight in pairs for piece in split_rows(batch, max_tokens)]
    for i, (batch, weight) in enumerate(pieces):
        with parallel.sync(now=i == len(pieces) - 1):
            with precision.autocast():
                loss = parallel.loss_sum(batch) * (scale * weight)
            precision.backward(loss)
        total += loss.item()
    (total,) = parallel.sum(total)
    return total / parallel.world.size


class Precision:
    """Mixed precision on CUDA (bf16, or fp16 with loss scaling); plain fp32 elsewhere.

    On this kind of CPU bf16 matmuls are far slower than fp32, so a bf16/fp16 request off-GPU
    falls back to fp32 with a warning rather than silently running 100x slower.
    """

    def __init__(self, requested: str = "fp32", device: torch.device | None = None):
        on_cuda = device is not None and device.type == "cuda"
        if requested != "fp32" and not on_cuda:
            log.warning("train.precision %s needs a GPU; training in fp32 on %s", requested, device)
        self.dtype = DTYPES[requested] if on_cuda and requested != "fp32" else None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self, optimizer, params, max_grad_norm: float, clip=torch.nn.utils.clip_grad_norm_) -> float:
        """Unscale and clip the gradients with `clip(params, max_norm)` (0: no clipping); return their norm."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            return float(clip(params, max_grad_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    def apply(self, optimizer) -> None:
        """Step after `clip`; with fp16 a step whose gradients overflowed is skipped."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self) -> None:
        """Drop a clipped step without applying it (the scaler still closes its step)."""
        if self.scaler:
            self.scaler.update()

    def step(self, optimizer, params, max_grad_norm: float) -> None:
        """`clip` then `apply`, for callers that do not look at the gradient norm."""
        self.clip(optimizer, params, max_grad_norm)
        self.apply(optimizer)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch, packed or padded."""
    return int(batch["real_tokens"]) if "real_tokens" in batch else int(batch["attention_mask"].sum())


def train(
    model: nn.Module,
    train_examples: list[dict],
    eval_examples: list[dict],
    config: TrainConfig,
    objective,
    run_state: dict | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    run_log: RunLog | None = None,
) -> TrainResult:
    """Train the active adapter of `model` in place; return what happened.

    The loss of an optimizer step is the sum of token losses over all of its accumulated
    micro-batches divided by their total label-token count, so each token weighs the same.
    `eval_examples` are the only examples that evaluation, keep-best and the time budget's last
    evaluation look at; `on_eval(step, metrics)` is called after each evaluation. At the end the
    best checkpoint's adapter (by `metric_for_best`) is loaded back into the model and written to
    `<output_dir>/adapter/`. Metrics go to `run_log` (metrics.jsonl and the trackers of
    train.report_to; by default metrics.jsonl alone).
    """
    out = Path(config.output_dir)
    device = next(p for p in model.parameters()).device
    seed_everything(config.seed)
    world = current_world()  # one process, or this rank of a torchrun / accelerate launch
    batches = Batches(train_examples, config.batch_size, grad_accum_for(config, world), objective.collate,
                      config.seed, world, config.group_by_length)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    parallel = DataParallel(model, objective, world, config.fsdp)  # before the optimizer: FSDP re-wraps params
    optimizer = build_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    precision = Precision(config.precision, device)
    scheduler = build_scheduler(optimizer, config, total_steps)
    lean_path = _prepare_model(model, config)

    unweighed, weighed = unevaluated_saves(config, total_steps, steps_per_epoch)
    if unweighed and world.main:
        log.warning("%d of the run's %d checkpoints fall on steps that are not evaluated (the first at step %d): "
                    "keep-best cannot weigh them; make train.save_steps a multiple of train.eval_steps (or both "
                    "strategies epoch)", len(unweighed), len(unweighed) + weighed, unweighed[0])
    checkpoints = RunCheckpoints(out, config, ADAPTER, parallel, world, batches, precision.scaler, run_state)
    start_step, state = checkpoints.resume(model, optimizer, scheduler)
    if start_step > total_steps:
        log.warning("the checkpoint is at step %d, past this run's %d steps; nothing is trained and the run keeps "
                    "its %d steps", start_step, total_steps, start_step)
    metrics = _open_run_log(run_log or RunLog(out, enabled=world.main), start_step if state else None, parallel)
    guard = DivergenceGuard(config, metrics, precision.scaler)
    guard.load_state_dict(state.get("guard", {}))
    guard.remember(start_step, model, optimizer, scheduler)

    def evaluate(step: int) -> dict:
        model.eval()
        result = objective.evaluate(model, shard(eval_examples, world), config.batch_size, device)
        model.train()
        metrics.write(kind="eval", step=step, **result)
        if on_eval is not None:
            on_eval(step, result)
        return result

    model.train()
    started, window_tokens, window_start = time.time(), 0, time.time()
    last_eval: dict = {}
    bar = tqdm(total=total_steps, initial=start_step, disable=not (config.progress and world.main), desc="train", dynamic_ncols=True)
    deadline = started + 60 * config.max_minutes if config.max_minutes else None
    step = start_step
    while step < total_steps:
        step += 1
        micro = [({k: v.to(device) for k, v in b.items()}, weight) for b, weight in batches[step - 1]]
        step_loss = accumulate_gradients(model, micro, objective, precision, parallel, config.max_tokens_per_forward)
        window_tokens += sum(real_tokens(b) for b, weight in micro if weight)
        grad_norm = precision.clip(optimizer, trainable, config.max_grad_norm, parallel.clip)
        problem = guard.problem(step_loss, grad_norm)
        if problem:  # divergence: do not take this step; go back to the last good state
            step = _roll_back(step, problem, guard, precision, model, optimizer, scheduler, out, world)
            bar.n = step
            continue
        guard.scale_lr(optimizer, step)
        lr = scheduler.get_last_lr()[0] * guard.lr_factor(step)  # the rate this step takes (logged as HF logs it)
        precision.apply(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        guard.accept(step, step_loss)

        out_of_time = deadline is not None and step < total_steps and _any_rank(time.time() >= deadline, parallel)
        last = step == total_steps or out_of_time
        if step % config.logging_steps == 0 or last:
            elapsed = time.time() - window_start
            speed = parallel.sum(window_tokens)[0] / max(elapsed, 1e-9)
            loss = guard.logged_loss()  # the mean since the last log
            metrics.write(kind="train", step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=speed,
                          **objective.train_metrics())
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            window_tokens, window_start = 0, time.time()
        bar.update(1)

        epoch_end = step % steps_per_epoch == 0 or last
        due_eval = due(config.eval_strategy, config.eval_steps, step, epoch_end, out_of_time)
        result = evaluate(step) if due_eval and eval_examples else None
        last_eval = result or last_eval
        # an evaluated last step is saved too, so that keep-best weighs it rather than handing back an earlier one
        if due(config.save_strategy, config.save_steps, step, epoch_end, out_of_time) or (
                last and result is not None and config.save_strategy != "no"):
            checkpoints.save(step, result, model, optimizer, scheduler, guard)
        if out_of_time:  # train.max_minutes: a budget, not a schedule; the last step was evaluated and saved
            log.warning("train.max_minutes %g reached after step %d of %d; stopping", config.max_minutes, step, total_steps)
            break
    bar.close()
    if config.eval_strategy == "no" and eval_examples and not config.fsdp:  # the eval split, scored once at the end
        last_eval = evaluate(step)

    checkpoints.restore_best(model)  # keep-best: the model leaves with the best checkpoint's adapter
    with parallel.full_params():
        adapter_dir = save_adapter(model, out / "adapter", ADAPTER) if world.main else out / "adapter"
    barrier()
    metrics.plot()
    return TrainResult(
        steps=step,
        final_eval=last_eval,
        best_metric=checkpoints.best,
        best_checkpoint=str(checkpoints.best_path) if checkpoints.best_path else None,
        adapter_dir=str(adapter_dir),
        seconds=time.time() - started,
        history=metrics.events(),
        lean_path=lean_path,
        peak_memory=peak_memory(device),
    )


def _prepare_model(model: nn.Module, config: TrainConfig) -> dict:
    """Gradient checkpointing, the fused paths, and the allocator, as the config asks; returns what applied. What
    loading, quantising (QLoRA) and casting the base (train.half_base) freed goes back to the OS first: the
    allocator keeps freed pages, and a base built in fp32 left as much resident as the fp32 model."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharded = config.fsdp  # FSDP owns the base weights: neither packed nor cast
    applied = use_fused_paths(model, config.fused, config.fuse_projections and not sharded,
                              "off" if sharded else config.half_base)
    log.info("lean path: %s", applied)
    release_free_memory()
    if config.release_memory:
        release_freed_memory()
    return applied


def _any_rank(flag: bool, parallel: DataParallel) -> bool:
    """Whether `flag` holds on any process: a decision every rank must take alike (stop at the time budget: each
    rank's clock and start differ, and a rank that stopped alone would leave the others waiting on it)."""
    return parallel.sum(float(flag))[0] > 0 if parallel.world.size > 1 else flag


def _open_run_log(run_log: RunLog, resume_step: int | None, parallel: DataParallel) -> RunLog:
    """`run_log` opened (its trackers start on rank 0, which writes): every rank stops with the same one-line error
    when a tracker cannot start, rather than the others waiting on rank 0 until they lose contact with it."""
    try:
        run_log.open(resume_step)
        failed = None
    except ConfigError as err:
        failed = err
    if _any_rank(failed is not None, parallel):
        raise failed or ConfigError("train.report_to: a tracker could not start on rank 0 (its message says why)")
    return run_log


def _roll_back(step: int, problem: str, guard: DivergenceGuard, precision: Precision, model: nn.Module,
               optimizer, scheduler, out: Path, world) -> int:
    """Drop the diverged step and return to the guard's last good state; returns the step to go on from.

    Raises:
        DivergenceError: it diverged again after train.max_rollbacks rollbacks; the adapter is saved first.
    """
    precision.skip()
    optimizer.zero_grad(set_to_none=True)
    try:
        return guard.rollback(step, problem, model, optimizer, scheduler)
    except DivergenceError as err:
        if world.main:
            save_adapter(model, out / "adapter", ADAPTER)
        hint = f"its adapter is in {out / 'adapter'}; try a lower train.lr"
        raise DivergenceError(f"{err}; {hint}") from None
