"""The `lorakit` command: one module per subcommand, each exposing `add_parser` and `run`."""

from __future__ import annotations

import argparse
import logging
import os

from lorakit.cli.failures import USER_ERRORS, report

__all__ = ["USER_ERRORS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from lorakit.cli import classify, dashboard, export, generate, inspect, merge, merge_adapters, mine, serve, train
    from lorakit.cli import eval as eval_cmd

    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA / QLoRA fine-tuning of Hugging Face models, and the adapters it trains.",
        epilog="Run `lorakit COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also accepted after the command)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, generate, classify, eval_cmd, merge, merge_adapters, export, inspect, serve, dashboard, mine):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `lorakit` command; returns its exit code (see lorakit.cli.failures for what each means)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.INFO if args.verbose or args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level == logging.WARNING and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its loading and saving bars: lorakit says what it did
        enable_progress_bars()  # which turned the Hub's off too: a download still shows its progress
    try:
        return args.run(args, extra) or 0
    except (Exception, KeyboardInterrupt) as err:  # SystemExit passes: it carries its own code
        return report(err, args.command, args.debug)
