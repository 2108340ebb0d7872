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


def test_variants_take_turns_in_the_order_given_and_in_reverse_every_other_turn(capsys):
    ran = []
    labels = ("merged", "mixed-16-lora-int8", "mixed-16")
    variants = {label: (lambda label=label: ran.append(label)) for label in labels}
    args = argparse.Namespace(warmup=1, repeats=2, turns=3, device="cpu")
    runs = serve_throughput.timed_rounds(variants, args)
    forward, backward = ["merged", "mixed-16-lora-int8", "mixed-16"], ["mixed-16", "mixed-16-lora-int8", "merged"]
    assert ran[3:] == (forward + backward) * 3  # after one warm-up each: the reversal runs on across rounds
    assert [(r["repeat"], r["turn"]) for r in runs[:6]] == [(1, 1)] * 3 + [(1, 2)] * 3
    assert [r["variant"] for r in runs] == ran[3:]


def test_variants_keep_the_order_given_and_an_unknown_one_exits_with_code_2(capsys):
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(adapters=16, quantize=[], lora_dtype=["int8"], half_weights=None, skip_peft=True,
                              variants="mixed-16-lora-int8,merged,mixed-16-lora-int8")
    assert serve_throughput.chosen_variants(parser, args) == ["mixed-16-lora-int8", "merged"]
    args.variants = "merged,mixed-99"
    with pytest.raises(SystemExit) as exit_:
        serve_throughput.chosen_variants(parser, args)
    assert exit_.value.code == 2 and "mixed-99" in capsys.readouterr().err
