"""What the property tests share: odd characters, example counts per profile, and a hang detector.

The Hypothesis profiles themselves ("ci", the default, and "thorough") are registered in conftest.py.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from hypothesis import settings

# Characters that have broken text readers elsewhere: BOM, NUL, bidi controls (RLO, RLM, LRE, PDF),
# JSON's line and paragraph separators, NEL, vertical tab, form feed, a combining mark, an emoji,
# and CR / LF inside a value.
ODD_CHARS = ["\ufeff", "\x00", "\u202e", "\u200f", "\u202a", "\u202c", "\u2028", "\u2029", "\x85", "\x0b", "\x0c",
             "\u0301", "\U0001f600", "\r", "\n", "\t", '"', "\\", ",", "{", "}", "[", "]"]


def examples(share: float) -> settings:
    """Settings running `share` of the profile's examples (at least 2): for properties whose every
    example costs many reads, so that `--hypothesis-profile thorough` scales them too."""
    return settings(max_examples=max(2, round(settings.default.max_examples * share)))


class Hang(Exception):
    """A read took longer than its limit."""


@contextmanager
def time_limit(seconds: int):
    """Fail (with Hang) instead of hanging: SIGALRM after `seconds`."""

    def expired(signum, frame):
        raise Hang(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
