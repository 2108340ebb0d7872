"""bench/serve_throughput.py's rounds: a round's figure over its turns, ratios within a round."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
serve_throughput = importlib.import_module("serve_throughput")


def test_a_rounds_figure_is_its_turns_tokens_over_their_summed_time_and_ratios_stay_within_a_round():
    seconds = {(1, "merged"): [2.0, 2.0], (1, "mixed-16-lora-int8"): [2.0, 3.0],
               (2, "merged"): [1.0, 3.0], (2, "mixed-16-lora-int8"): [4.0, 4.0]}
    runs = [{"repeat": repeat, "turn": turn + 1, "variant": variant, "seconds": s}
            for (repeat, variant), times in seconds.items() for turn, s in enumerate(times)]
    rounds = {(r["repeat"], r["variant"]): r for r in serve_throughput.round_figures(runs, tokens=100)}
    assert rounds[(1, "mixed-16-lora-int8")]["tokens_per_s"] == pytest.approx(200 / 5)  # not the mean of 50 and 33
    assert rounds[(2, "merged")]["seconds"] == pytest.approx(4.0)
    args = argparse.Namespace(adapters=16, quantize=[], lora_dtype=["int8"])
    rows = {row["what"]: row for row in serve_throughput.summarise(list(rounds.values()), args)}
    ratio = rows["mixed-16-lora-int8 / merged"]
    assert ratio["min"] == pytest.approx(0.5) and ratio["max"] == pytest.approx(0.8)  # 4/8 and 4/5, round by round
