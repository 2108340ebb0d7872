"""The one way a subcommand's parser is made: help line, description, and examples kept as written."""

from __future__ import annotations

import argparse


def subcommand(commands, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=description, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
