"""Which examples each optimizer step, and each process of a data-parallel run, trains on.

A step's *global batch* is the next `batch_size x processes x grad_accum` examples of the epoch's
seeded order (the last step of an epoch may be shorter). It is cut into `grad_accum` groups of
`batch_size x processes`; process `rank` takes every `processes`-th example of each group from
position `rank`. The shares never overlap and together are the whole global batch, so with the
loss normalised by the global label count, 2 processes give the gradient of 1 process with twice
the micro-batch (or twice the accumulation). Everything is a function of the step index, so resume
needs no sampler state, and a run can resume with another process count as long as the global
batch stays the same. Packing happens after sharding: each process packs its own examples.
"""

from __future__ import annotations

import math

import torch

from lorakit.config import ConfigError
from lorakit.train.distributed import World
from lorakit.train.length_grouping import length_grouped


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a fixed function of (seed, epoch), so resume can replay it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class Batches:
    """`batches[i]`: this process's micro-batches of optimizer step i (0-based), as (batch, weight) pairs.

    A process whose share of a group is empty (the short last step of an epoch) gets one example
    with weight 0: it still runs forward and backward, so the gradient all-reduce meets, but adds
    nothing to the loss or the gradient.
    """

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        grad_accum: int,
        collate,
        seed: int,
        world: World | None = None,
        group_by_length: bool = False,
    ):
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.lengths = [len(e["input_ids"]) for e in examples] if group_by_length else None
        self.collate, self.seed, self.world = collate, seed, world or World()
        self.global_batch = batch_size * grad_accum * self.world.size
        self.steps_per_epoch = math.ceil(len(examples) / self.global_batch)
        self._orders: dict[int, list[int]] = {}

    def groups(self, index: int) -> list[list[int]]:
        """Example indices of step `index` across all processes: one list per micro-batch."""
        epoch, within = divmod(index, self.steps_per_epoch)
        size = self.batch_size * self.world.size
        if epoch not in self._orders:
            order = epoch_order(len(self.examples), self.seed, epoch)
            if self.lengths is not None:  # similar lengths in each step, grouped by the global batch: the same
                # order on any process count (a resume on another count neither repeats nor skips examples)
                order = length_grouped(order, self.lengths, self.global_batch, self.seed * 100_003 + epoch)
            self._orders = {epoch: order}
        step_ids = self._orders[epoch][within * self.global_batch : (within + 1) * self.global_batch]
        return [step_ids[i : i + size] for i in range(0, len(step_ids), size)]

    def ids(self, index: int) -> list[list[int]]:
        """This process's share of each micro-batch of step `index` (may be empty on a short last step)."""
        return [group[self.world.rank :: self.world.size] for group in self.groups(index)]

    def __getitem__(self, index: int) -> list[tuple[dict, float]]:
        out = []
        for group in self.groups(index):
            mine = group[self.world.rank :: self.world.size]
            if mine:
                out.append((self.collate([self.examples[j] for j in mine]), 1.0))
            else:  # a stand-in that keeps this process in step with the others
                out.append((self.collate([self.examples[group[0]]]), 0.0))
        return out


def check_position(state: dict, batches: Batches, checkpoint) -> None:
    """A checkpoint's step means a data position only under the same global batch; refuse another one.

    Raises:
        ConfigError: the checkpoint was written with another global batch; the message says what to set.
    """
    saved = state.get("global_batch")
    if saved is None or saved == batches.global_batch:
        return
    per_step = batches.batch_size * batches.world.size
    fix = (
        f"set --train.global_batch_size {saved}"
        if saved % per_step == 0
        else f"choose batch_size and grad_accum so that batch_size x {batches.world.size} processes x grad_accum = {saved}"
    )
    raise ConfigError(
        f"{checkpoint}: written with a global batch of {saved} examples ({state.get('processes', '?')} processes), "
        f"but this run's is {batches.global_batch} (batch_size {batches.batch_size} x {batches.world.size} "
        f"processes x grad_accum {batches.grad_accum}); {fix} to resume it"
    )
