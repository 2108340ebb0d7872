"""best_times: every way runs once a round, in turn, and keeps its best time."""

from __future__ import annotations

import time

from lorakit.lora.turns import best_times


def test_each_way_runs_once_a_round_in_turn_and_keeps_its_best():
    order, slow_times = [], iter([0.06, 0.01, 0.04])

    def fast():
        order.append("fast")

    def slow():
        order.append("slow")
        time.sleep(next(slow_times))

    best = best_times({"fast": fast, "slow": slow}, rounds=3)
    assert order == ["fast", "slow"] * 3
    assert best["fast"] < best["slow"]
    assert 0.01 <= best["slow"] < 0.035  # the best of its three rounds, not the first or the last
