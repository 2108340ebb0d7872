"""`lorakit train CONFIG.yaml [--nproc N] [--section.key VALUE ...]`"""

from __future__ import annotations

import contextlib
import os
import sys

from lorakit.cli.failures import INTERRUPTED_CODE, TERMINATED_CODE, Terminated, sigterm_as_interrupt
from lorakit.cli.parsing import add_quantization_flags, non_empty, subcommand

EXAMPLES = """examples:
  lorakit train examples/ros2/config.yaml
  lorakit train examples/ros2/config.yaml --train.lr 5e-4 --lora.r 16
  lorakit train examples/ros2/config.yaml --resume                 # continue from the last checkpoint
  lorakit train examples/ros2/config.yaml --nproc 2                # data parallel: runs torchrun for you
  torchrun --nproc_per_node 2 -m lorakit train examples/ros2/config.yaml       # the same
  accelerate launch --multi_gpu --num_processes 2 -m lorakit train examples/ros2/config.yaml
  lorakit train examples/ros2/config.yaml --load-in-4bit --train.gradient_checkpointing true   # QLoRA
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "train",
        help="fine-tune a model with LoRA from a YAML config",
        description="Fine-tune with LoRA as the YAML config says. Any key can be overridden as --section.key VALUE. "
        "Under torchrun or accelerate launch each process trains on its share of every global batch "
        "(train.batch_size is per process).",
        examples=EXAMPLES,
    )
    parser.add_argument("config", type=non_empty,
                        help="YAML run config (sections: model, task, lora, quantization, data, preference, train, "
                        "eval)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine: starts `torchrun --standalone` with them",
    )
    add_quantization_flags(parser)
    parser.set_defaults(run=run, accepts_overrides=True)


def run(args, overrides: list[str]) -> int:
    from lorakit.config import ConfigError
    from lorakit.config_loading import load_run_config
    from lorakit.data.dataset import require_train_data
    from lorakit.run import run as run_training
    from lorakit.train.distributed import (
        ProcessLost, World, grad_accum_for, is_lost_contact, launched_world, short_reason,
    )

    if args.nproc < 1:
        raise ConfigError(f"--nproc: given {args.nproc}, expected a positive number of processes")
    given = overrides
    if args.bits and any(o.split("=", 1)[0] == "--quantization.bits" for o in overrides):
        raise ConfigError(f"--load-in-{args.bits}bit and --quantization.bits both set the base's bits; give one")
    if args.resume:
        overrides = [*overrides, "--train.resume", "true"]
    if args.bits:
        overrides = [*overrides, "--quantization.bits", str(args.bits)]
    config = load_run_config(args.config, overrides)  # checked here, before torchrun starts N processes on it
    require_train_data(config.data)
    if args.nproc > 1 and launched_world().size == 1:
        grad_accum_for(config.train, World(size=args.nproc))  # the global batch must split over the processes
        return _exec_torchrun(args, given)
    rank = launched_world().rank
    alone = launched_world().size == 1  # sigterm_as_interrupt leaves a thread other than the main one alone
    # a lone run stopped with SIGTERM (timeout, kill, a job scheduler) ends as Ctrl-C does: status interrupted;
    # under a launcher, SIGTERM means another process failed (train/distributed.py)
    try:
        with sigterm_as_interrupt() if alone else contextlib.nullcontext():
            run_training(config)
    except KeyboardInterrupt as stop:
        print(f"lorakit train: interrupted; {_where_to_resume(config.train.output_dir)}", file=sys.stderr)
        return TERMINATED_CODE if isinstance(stop, Terminated) else INTERRUPTED_CODE
    except (ProcessLost, RuntimeError) as err:
        if not (isinstance(err, ProcessLost) or is_lost_contact(err)):
            raise
        what = (
            str(err)
            if isinstance(err, ProcessLost)
            else f"lost contact with another process ({short_reason(err)})"
        )
        print(
            f"lorakit train: error: rank {rank} stopped: {what}; the run can continue from its last "
            f"checkpoint in {config.train.output_dir}/checkpoints with --resume, on any process count",
            file=sys.stderr,
        )
        return 1
    return 0


def _exec_torchrun(args, overrides: list[str]) -> int:
    """Replace this process by torchrun running the same command once per process (never returns)."""
    command = ["train", args.config, *(["--resume"] if args.resume else []), *overrides,
               *(["--quantization.bits", str(args.bits)] if args.bits else [])]
    if args.verbose:
        command.insert(0, "--verbose")
    if args.debug:
        command.insert(0, "--debug")
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    os.execv(sys.executable, [*launcher, "-m", "lorakit", *command])


def _where_to_resume(run_dir: str) -> str:
    from lorakit.checkpoint.resume import latest_good_checkpoint

    last = latest_good_checkpoint(run_dir)
    return f"the last complete checkpoint is {last}; continue with --resume" if last else "no checkpoint was written"
