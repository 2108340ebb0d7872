"""`lorakit train CONFIG.yaml [--section.key VALUE ...]`"""

from __future__ import annotations

from lorakit.cli.parsing import add_quantization_flags, subcommand

EXAMPLES = """examples:
  lorakit train examples/ros2/config.yaml
  lorakit train examples/ros2/config.yaml --train.lr 5e-4 --lora.r 16
  lorakit train examples/ros2/config.yaml --train.resume true     # continue from the last checkpoint
  lorakit train examples/ros2/config.yaml --load-in-4bit --train.gradient_checkpointing true   # QLoRA
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
    add_quantization_flags(parser)
    parser.set_defaults(run=run, accepts_overrides=True)


def run(args, overrides: list[str]) -> int:
    from lorakit.config import load_run_config
    from lorakit.run import run as run_training

    if args.resume:
        overrides = [*overrides, "--train.resume", "true"]
    if args.bits:
        overrides = [*overrides, "--quantization.bits", str(args.bits)]
    config = load_run_config(args.config, overrides)
    run_training(config)
    return 0
