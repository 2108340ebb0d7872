"""Divergence guard: roll back to the last good state, train on at a lower rate, then restore it.

The second seed's manual habit, automated. Before each optimizer step the loop asks `problem()`
whether the step's loss or gradient norm is NaN/inf, or the loss spiked beyond `spike_factor` x
the mean of the last `spike_window` accepted losses. If so the step is not taken and
`rollback()` restores the last good state, multiplies the learning rate by `rollback_lr_factor`
for the `rollback_lr_steps` steps after it, and the run replays from there (its batches are a
function of the step, so it sees the same data again).

The last good state is an in-memory copy of what the latest checkpoint holds (trainable tensors,
optimizer, scheduler, grad scaler, RNGs, the guard's loss window), taken whenever a checkpoint
is written and at the start of the run, so a rollback reads nothing from disk and works with
saving off. A rollback counts as "in a row" until the run gets past the step where it diverged
with the lowered rate done; after `max_rollbacks` in a row the next divergence stops the run with
`DivergenceError` and the model holding the last good weights.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lorakit.config import TrainConfig

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training diverged again after `max_rollbacks` rollbacks in a row; the message is one line."""


@dataclass
class Snapshot:
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: tuple
    losses: list[float]
    unlogged: list[float]


class DivergenceGuard:
    """Watches each step's loss and gradient norm; rolls the run back when it diverges."""

    def __init__(self, config: TrainConfig, metrics=None, scaler=None):
        self.config, self.metrics, self.scaler = config, metrics, scaler
        self.losses: deque[float] = deque(maxlen=config.spike_window)
        self.unlogged: list[float] = []  # the losses of the steps taken since the last logged one
        self.in_a_row = 0
        self.lowered_until = 0  # the LR is multiplied by rollback_lr_factor for steps <= this
        self.diverged_at = 0
        self.last_good: Snapshot | None = None

    def problem(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must not be taken (one phrase), or None when it looks healthy."""
        if not self.config.guard:
            return None
        if not math.isfinite(loss):
            return f"loss is {loss}"
        # With fp16 loss scaling an overflowing gradient is the scaler's business: it skips the step.
        if self.scaler is None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        factor, window = self.config.spike_factor, self.losses
        if factor > 0 and len(window) == window.maxlen:
            average = sum(window) / len(window)
            if loss > factor * average:
                return f"loss {loss:.4g} is above {factor:g} x its recent average {average:.4g}"
        return None

    def lr_factor(self, step: int) -> float:
        return self.config.rollback_lr_factor if step <= self.lowered_until else 1.0

    def scale_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Lower this step's rate after a rollback (the scheduler sets it afresh at its next step)."""
        factor = self.lr_factor(step)
        if factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def accept(self, step: int, loss: float) -> None:
        """A healthy step was taken: remember its loss; past the trouble, the count starts over."""
        self.losses.append(loss)
        self.unlogged.append(loss)
        if self.in_a_row and step > max(self.diverged_at, self.lowered_until):
            log.info("recovered: step %d passed the divergence at step %d", step, self.diverged_at)
            self._event(kind="recovered", step=step, lr_factor=1.0)
            self.in_a_row = 0
        elif step == self.lowered_until:
            self._event(kind="lr_restored", step=step)

    def logged_loss(self) -> float:
        """The mean loss of the steps since the last logged one, as transformers' Trainer logs it (not the last
        step's alone); the next log starts afresh. Kept with the snapshots and checkpoints, so a rollback or a
        resume logs what an uninterrupted run logs."""
        mean = sum(self.unlogged) / len(self.unlogged) if self.unlogged else float("nan")
        self.unlogged = []
        return mean

    @torch.no_grad()
    def remember(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        """Keep the state after `step` as the last good one (call when a checkpoint is written)."""
        self.last_good = Snapshot(
            step=step,
            params={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            optimizer=copy.deepcopy(optimizer.state_dict()),
            scheduler=copy.deepcopy(scheduler.state_dict()),
            scaler=copy.deepcopy(self.scaler.state_dict()) if self.scaler else None,
            rng=_rng_state(),
            losses=list(self.losses),
            unlogged=list(self.unlogged),
        )

    @torch.no_grad()
    def rollback(self, step: int, problem: str, model: nn.Module, optimizer, scheduler) -> int:
        """Restore the last good state and lower the rate; return the step to continue after.

        Raises:
            DivergenceError: this is divergence number `max_rollbacks + 1` in a row (the model
                holds the last good weights when it is raised).
        """
        good = self.last_good
        assert good is not None, "remember() must be called before training starts"
        params = dict(model.named_parameters())
        for name, saved in good.params.items():
            params[name].copy_(saved)
        optimizer.load_state_dict(copy.deepcopy(good.optimizer))
        scheduler.load_state_dict(copy.deepcopy(good.scheduler))
        if self.scaler is not None and good.scaler is not None:
            self.scaler.load_state_dict(copy.deepcopy(good.scaler))
        _set_rng_state(good.rng)
        self.losses = deque(good.losses, maxlen=self.config.spike_window)
        self.unlogged = list(good.unlogged)
        if self.in_a_row >= self.config.max_rollbacks:
            self._event(kind="stopped", step=step, reason=problem, to_step=good.step)
            raise DivergenceError(
                f"training diverged at step {step} ({problem}) after {self.in_a_row} rollbacks in a row "
                f"(train.max_rollbacks); stopped with the last good state, step {good.step}"
            )
        self.in_a_row += 1
        self.diverged_at = max(self.diverged_at, step) if self.in_a_row > 1 else step
        self.lowered_until = good.step + self.config.rollback_lr_steps
        log.warning(
            "step %d: %s; rolled back to step %d, learning rate x %g until step %d (rollback %d of %d)",
            step, problem, good.step, self.config.rollback_lr_factor, self.lowered_until,
            self.in_a_row, self.config.max_rollbacks,
        )
        self._event(
            kind="rollback", step=step, reason=problem, to_step=good.step,
            lr_factor=self.config.rollback_lr_factor, until_step=self.lowered_until, in_a_row=self.in_a_row,
        )
        return good.step

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses), "unlogged": list(self.unlogged), "in_a_row": self.in_a_row,
            "lowered_until": self.lowered_until, "diverged_at": self.diverged_at,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state.get("losses", []), maxlen=self.config.spike_window)
        self.unlogged = list(state.get("unlogged", []))
        self.in_a_row = state.get("in_a_row", 0)
        self.lowered_until = state.get("lowered_until", 0)
        self.diverged_at = state.get("diverged_at", 0)

    def _event(self, **event) -> None:
        if self.metrics is not None:
            self.metrics.write(**event)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, python, numpy = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)
