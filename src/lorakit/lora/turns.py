"""Timing ways of doing the same work against each other, as the kernels' one-time choices do (lora/base.py,
lora/onednn_linear.py): the ways take turns for a few rounds, so that a machine's drift falls on all of them, and
each keeps its best time."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


def best_times(ways: dict[Hashable, Callable[[], object]], rounds: int) -> dict[Hashable, float]:
    """way -> its best time in seconds over `rounds` rounds, in each of which every way runs once, in turn."""
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(rounds):
        for key, work in ways.items():
            start = time.perf_counter()
            work()
            best[key] = min(best[key], time.perf_counter() - start)
    return best
