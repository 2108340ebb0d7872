"""bench/dropout_step.py's per-round ratio."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
dropout_step = importlib.import_module("dropout_step")


def test_ratios_pair_each_rounds_two_steps_in_round_order():
    runs = [{"round": 2, "masks": "rand_like", "seconds": 3.0}, {"round": 2, "masks": "kernel", "seconds": 2.0},
            {"round": 1, "masks": "kernel", "seconds": 1.0}, {"round": 1, "masks": "rand_like", "seconds": 1.5}]
    assert dropout_step.ratios(runs) == [1.5, 1.5]
    runs[0]["seconds"] = 4.0
    assert dropout_step.ratios(runs) == [1.5, 2.0]
