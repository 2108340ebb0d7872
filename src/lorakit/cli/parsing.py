"""The one way a subcommand's parser is made: help line, description, and examples kept as written."""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default where it has one worth saying (not None, False or a
    default its help already names)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (text and default not in (None, False, argparse.SUPPRESS) and action.option_strings
                and "default" not in text and not isinstance(default, (list, tuple))):
            text += " (default: %(default)s)"
        return text


def subcommand(commands, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description, epilog=examples,
                                 formatter_class=HelpFormatter)
    # SUPPRESS: without the flag here, `lorakit --debug COMMAND` keeps the value the top level set.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    return parser


def positive_int(text: str) -> int:
    """An argparse type for counts (--batch-size, --max-new-tokens): a bad value is argparse's one line naming the
    flag, exit 2, before any model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"given {text!r}, expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"given {value}, expected a positive integer")
    return value


def non_empty(text: str) -> str:
    """An argparse type for a path, name or text that must say something: an empty or blank value is argparse's
    one line naming the flag, exit 2 (an empty path would otherwise mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"given {text!r}, expected a non-empty value")
    return text


def temperature(text: str) -> float:
    """An argparse type for a sampling temperature: a finite number >= 0 (0: greedy)."""
    value = _number(text, "a number >= 0 (0: greedy)")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"given {text}, expected a number >= 0 (0: greedy)")
    return value


def top_p(text: str) -> float:
    """An argparse type for nucleus sampling's share: a number in (0, 1]."""
    value = _number(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"given {text}, expected a number in (0, 1]")
    return value


def _number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"given {text!r}, expected {expected}") from None


def add_quantization_flags(parser: argparse.ArgumentParser) -> None:
    """--load-in-4bit / --load-in-8bit: the base's linear layers quantised by bitsandbytes (QLoRA)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-in-4bit", dest="bits", action="store_const", const=4,
                       help="quantise the base's linear layers to NF4 with double quantisation (QLoRA)")
    group.add_argument("--load-in-8bit", dest="bits", action="store_const", const=8,
                       help="quantise the base's linear layers to 8 bits (LLM.int8)")
