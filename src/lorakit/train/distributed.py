"""Data parallelism across processes started by an existing launcher (torchrun, accelerate launch).

lorakit has no launcher of its own: `torchrun --nproc_per_node N -m lorakit train CONFIG` and
`accelerate launch --multi_gpu --num_processes N -m lorakit train CONFIG` both start N copies of
the same command and set RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` reads them and joins the
process group (gloo on CPU, nccl on GPU). Without those variables everything here is a no-op and a
run is the plain single-process loop.

Every process holds a full copy of the model and trains on its own share of each global batch;
`DataParallel` wraps the loss in DDP, which averages the trainable gradients across processes in
backward. The loop divides each process's summed token loss by the *global* label-token count of
the step (an all-reduce) and multiplies by the process count, so DDP's average gives exactly the
gradient of one process seeing the whole global batch.

FSDP (`train.fsdp`) shards the frozen base as well, for bases too large for one GPU. It needs CUDA
and has not been run without a GPU; see README "Several processes".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lorakit.config import ConfigError

log = logging.getLogger(__name__)
_joined: dict = {}  # what init_from_env set up, so shutdown undoes only that


class ProcessLost(RuntimeError):
    """Another process of a data-parallel run stopped (or the launcher ended this one)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank in [0, size), and its GPU index on the node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs, metrics and plots; the others wait at a barrier."""
        return self.rank == 0


def launched_world() -> World:
    """The world the launcher's environment describes (RANK / WORLD_SIZE / LOCAL_RANK), else one process."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_from_env(timeout_s: float = 1800) -> World:
    """Join the process group the launcher set up; a no-op outside a launcher.

    Args:
        timeout_s: how long a collective waits for the other processes before this one gives up
            (a hung or dead rank); torchrun also tears the others down when one exits.

    Returns:
        This process's `World`.
    """
    world = launched_world()
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():  # not under a launcher (or joined already)
        return current_world()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(world.local_rank)  # so "cuda" (default_device) is this process's GPU
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    _joined["group"] = True
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
        _joined["sigterm"] = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    log.info("rank %d of %d joined the process group (%s)", world.rank, world.size, dist.get_backend())
    return world


def _stopped_by_launcher(signum, frame):
    raise ProcessLost("the launcher stopped this process (another process of the run failed)")


def current_world() -> World:
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), launched_world().local_rank)


def shutdown() -> None:
    """Leave the process group `init_from_env` joined (one the caller made itself is left alone)."""
    if _joined.pop("group", False) and dist.is_initialized():
        dist.destroy_process_group()
    if "sigterm" in _joined:
        signal.signal(signal.SIGTERM, _joined.pop("sigterm"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(*values: float) -> list[float]:
    """Each value summed over all processes (float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes (a copy; the input is unchanged)."""
    if not dist.is_initialized():
        return tensor
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    out = tensor.to(device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def shard(items: list, world: World | None = None) -> list:
    """This process's share of `items`: every `size`-th one from its rank, so shares never overlap."""
    world = world or current_world()
    return items[world.rank :: world.size]


def grad_accum_for(config, world: World) -> int:
    """Micro-batches per step: `train.grad_accum`, or what `train.global_batch_size` implies.

    Raises:
        ConfigError: the global batch is not a multiple of batch_size x processes, or disagrees
            with an explicit grad_accum.
    """
    if not config.global_batch_size:
        return config.grad_accum
    per_step = config.batch_size * world.size
    accum, rest = divmod(config.global_batch_size, per_step)
    if rest or accum == 0:
        raise ConfigError(
            f"train.global_batch_size: given {config.global_batch_size}, expected a multiple of "
            f"batch_size {config.batch_size} x {world.size} processes = {per_step}"
        )
    if config.grad_accum not in (1, accum):
        raise ConfigError(
            f"train.grad_accum: given {config.grad_accum}, but global_batch_size {config.global_batch_size} = "
            f"batch_size {config.batch_size} x {world.size} processes x {accum}; set one of them"
        )
    return accum


class LossOf(nn.Module):
    """`objective.loss_sum(model, batch)` as a module's forward, so DDP/FSDP see the forward pass."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.objective.loss_sum(self.model, batch)


class DataParallel:
    """This process's part of a step: the (wrapped) loss, gradient sync control, and the collectives."""

    def __init__(self, model: nn.Module, objective, world: World | None = None, fsdp: bool = False):
        self.world = world or current_world()
        self.model, self.fsdp = model, fsdp
        self.loss: nn.Module = LossOf(model, objective)
        if self.world.size > 1 or fsdp:
            self.loss = _wrap_fsdp(self.loss) if fsdp else _wrap_ddp(self.loss, self.world)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(batch)

    def sync(self, now: bool):
        """Gradients are all-reduced in the backward of the last micro-batch of a step only."""
        if now or not hasattr(self.loss, "no_sync"):
            return contextlib.nullcontext()
        return self.loss.no_sync()

    def sum(self, *values: float) -> list[float]:
        return all_reduce_sum(*values)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradient norm and return it (before clipping); under FSDP over all shards."""
        if self.fsdp:
            return self.loss.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_params(self, writeback: bool = False):
        """Under FSDP, the whole (unsharded) model inside the block, to save or load the adapter.

        Every process must enter it (it is a collective); elsewhere it does nothing.
        """
        if not self.fsdp:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(self.loss, writeback=writeback)


def _wrap_ddp(loss: LossOf, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainable = [p for p in loss.parameters() if p.requires_grad]
    for p in trainable:  # the same start everywhere; the frozen base is loaded identically by every rank
        dist.broadcast(p.data, src=0)
    on_gpu = next(loss.parameters()).device.type == "cuda"
    # init_sync=False: broadcasting a frozen multi-GB base at start-up would be wasted time; the
    # buffers (rotary tables) are constants, so they need no sync in every forward either.
    return DDP(
        loss, device_ids=[world.local_rank] if on_gpu else None, forward_sync_buffers=False, init_sync=False
    )


def _wrap_fsdp(loss: LossOf) -> nn.Module:
    """Shard each transformer block (the model's `_no_split_modules`) and the rest across processes."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if not torch.cuda.is_available():
        raise ConfigError("train.fsdp: given true, but FSDP needs CUDA GPUs; use plain data parallel on CPU")
    names = set(getattr(loss.model, "_no_split_modules", None) or [])
    blocks = {type(m) for m in loss.model.modules() if type(m).__name__ in names}
    # use_orig_params: the frozen base and the trainable LoRA tensors can share one flat parameter.
    return FSDP(
        loss,
        auto_wrap_policy=ModuleWrapPolicy(blocks),
        use_orig_params=True,
        device_id=torch.cuda.current_device(),
    )


def is_lost_contact(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another process died, hung or closed its connection."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return launched_world().size > 1 and any(
        w in text
        for w in ("connection closed", "connection reset", "timed out", "gloo", "nccl", "broken pipe")
    )


def short_reason(err: BaseException) -> str:
    """The gist of a backend error: its first sentence, without the C++ source location."""
    text = re.sub(
        r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else ""
    )
    return text.split(". ")[0] or type(err).__name__
