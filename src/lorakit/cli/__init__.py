"""The `lorakit` command: one module per subcommand, each exposing `add_parser` and `run`."""

from __future__ import annotations

import argparse
import logging
import sys

from lorakit.checkpoint.peft_io import AdapterError
from lorakit.config import ConfigError
from lorakit.data.formats import DataError
from lorakit.export.errors import ExportError
from lorakit.models import ModelNotFoundError
from lorakit.train.guard import DivergenceError

# OSError: a folder that cannot be written, a full disk: one line, not a traceback.
USER_ERRORS = (ConfigError, DataError, AdapterError, ExportError, ModelNotFoundError, DivergenceError, OSError)


def build_parser() -> argparse.ArgumentParser:
    from lorakit.cli import classify, dashboard, export, generate, inspect, merge, mine, serve, train
    from lorakit.cli import eval as eval_cmd

    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA / QLoRA fine-tuning of Hugging Face models, and the adapters it trains.",
        epilog="Run `lorakit COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, generate, classify, eval_cmd, merge, export, inspect, serve, dashboard, mine):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args, extra) or 0
    except USER_ERRORS as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
