"""What the `lorakit` command prints when a command fails: one line, never a traceback (unless --debug).

Exit codes:

* 2: bad input: a config value, a data file, an adapter or model folder, a path that cannot be
  written (`USER_ERRORS`, and argparse's own usage errors). The line names the file, line or
  field and what was expected.
* 1: an internal error: an exception lorakit did not expect, i.e. a bug (or a process of a
  data-parallel run that was lost). The line gives the exception's type and message and asks for
  a re-run with --debug, which prints the traceback.
* 130: interrupted (Ctrl-C); `lorakit train` says where it can resume from. 143: stopped by SIGTERM, where a
  command turns it into `Terminated` (train, export) so that it ends as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback

from lorakit.checkpoint.peft_io import AdapterError
from lorakit.config import ConfigError
from lorakit.data.formats import DataError
from lorakit.export.errors import ExportError
from lorakit.models import ModelNotFoundError
from lorakit.train.guard import DivergenceError

# OSError: a folder that cannot be written, a full disk: one line, not a traceback.
USER_ERRORS = (ConfigError, DataError, AdapterError, ExportError, ModelNotFoundError, DivergenceError, OSError)
USER_ERROR_CODE = 2
INTERNAL_ERROR_CODE = 1
INTERRUPTED_CODE = 130
MAX_MESSAGE_CHARS = 1000  # a message quoting a whole file or tensor is cut, so the line stays readable


TERMINATED_CODE = 143  # 128 + SIGTERM, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM, met as Ctrl-C is (a run's status says interrupted, a half-written file is removed) but told apart by
    its exit code."""


def _terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While in the block, SIGTERM raises Terminated (in the main thread; elsewhere it is left as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(message: str) -> str:
    """The message with every run of whitespace (newlines included) made one space, and cut if very long."""
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def report(err: BaseException, command: str, debug: bool) -> int:
    """Print the one line for an exception that ended `command`; return the exit code."""
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, KeyboardInterrupt):
        print(f"lorakit {command}: interrupted", file=sys.stderr)
        return TERMINATED_CODE if isinstance(err, Terminated) else INTERRUPTED_CODE
    if isinstance(err, USER_ERRORS):
        print(f"lorakit {command}: error: {one_line(str(err))}", file=sys.stderr)
        return USER_ERROR_CODE
    what = one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
    hint = "" if debug else "; re-run with --debug for the traceback"
    print(f"lorakit {command}: internal error: {what} (a bug in lorakit{hint}, and please report it)",
          file=sys.stderr)
    return INTERNAL_ERROR_CODE
