"""`lorakit train CONFIG.yaml [--section.key VALUE ...]`"""

from __future__ import annotations

import sys

from lorakit.cli.parsing import subcommand

EXAMPLES = """examples:
  lorakit train examples/ros2/config.yaml
  lorakit train examples/ros2/config.yaml --train.lr 5e-4 --lora.r 16
  lorakit train examples/ros2/config.yaml --train.resume true     # continue from the last checkpoint
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "train",
        help="fine-tune a model with LoRA from a YAML config",
        description="Fine-tune with LoRA as the YAML config says. Any key can be overridden as --section.key VALUE.",
        examples=EXAMPLES,
    )
    parser.add_argument("config", help="YAML run config (sections: model, task, lora, data, train, eval)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.set_defaults(run=run, accepts_overrides=True)


def run(args, overrides: list[str]) -> int:
    from lorakit.config import load_run_config
    from lorakit.run import run as run_training

    if args.resume:
        overrides = [*overrides, "--train.resume", "true"]
    config = load_run_config(args.config, overrides)
    try:
        run_training(config)
    except KeyboardInterrupt:
        print(f"lorakit train: interrupted; {_where_to_resume(config.train.output_dir)}", file=sys.stderr)
        return 130
    return 0


def _where_to_resume(run_dir: str) -> str:
    from lorakit.checkpoint.resume import latest_good_checkpoint

    last = latest_good_checkpoint(run_dir)
    return f"the last complete checkpoint is {last}; continue with --resume" if last else "no checkpoint was written"
