"""bench/train_throughput.py's summary: every run's ratios within its own round, only where both sides ran."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
train_throughput = importlib.import_module("train_throughput")


def _run(repeat: int, variant: str, tok_s: float, rss: float, losses: list[float],
         training: float | None = None) -> dict:
    """A child's result; `training`: its largest RSS during the steps (default: the process peak)."""
    return {"repeat": repeat, "variant": variant, "real_tokens_per_s": tok_s, "mfu": tok_s / 1000,
            "peak_rss_mb": rss, "training_peak_rss_mb": rss if training is None else training, "losses": losses}


def test_summary_of_a_subset_has_only_the_ratios_whose_sides_ran():
    runs = [_run(1, "b", 100.0, 3000.0, [2.0, 1.0]), _run(1, "c", 150.0, 1500.0, [2.0, 1.1]),
            _run(1, "e", 50.0, 900.0, [2.0, 1.2]),
            _run(2, "b", 80.0, 3000.0, [2.0, 1.0]), _run(2, "c", 160.0, 1800.0, [2.0, 1.0]),
            _run(2, "e", 40.0, 1200.0, [2.0, 1.0])]
    variants = {v: v for v in "bce"}
    rows = {row["what"]: row for row in train_throughput.summarise(runs, variants)}
    assert not [what for what in rows if " / a " in what or what.startswith(("a ", "d "))]
    speed = rows["c / b speed (same round)"]
    assert speed["min"] == pytest.approx(1.5) and speed["max"] == pytest.approx(2.0)  # per round, not pooled
    assert rows["e / b peak memory"]["min"] == pytest.approx(0.3)
    assert rows["e / b peak memory"]["max"] == pytest.approx(0.4)
    assert rows["e vs b: largest relative loss gap per step"]["max"] == pytest.approx(0.2)


def test_summary_without_the_baseline_has_no_ratios():
    rows = train_throughput.summarise([_run(1, "c", 150.0, 1500.0, [1.0])], {"c": "c"})
    assert [row["what"] for row in rows] == ["c real tok/s", "c MFU"]


def test_summary_compares_the_half_base_with_fp32_lorakit_and_peft():
    runs = [_run(1, "b", 100.0, 3000.0, [2.0, 1.0], training=2900.0), _run(1, "c", 150.0, 1500.0, [2.0, 1.0]),
            _run(1, "h", 300.0, 1200.0, [2.0, 1.01], training=870.0)]  # h's process peak: loading the fp32 model
    rows = {row["what"]: row for row in train_throughput.summarise(runs, {v: v for v in "bch"})}
    assert rows["h / c speed (same round)"]["median"] == pytest.approx(2.0)
    assert rows["h / b speed (same round)"]["median"] == pytest.approx(3.0)
    assert rows["h / b peak memory"]["median"] == pytest.approx(0.4)
    assert rows["h / b training peak memory (loading left out)"]["median"] == pytest.approx(0.3)
    assert rows["h vs b: largest relative loss gap per step"]["median"] == pytest.approx(0.01)


def test_curve_gap_compares_running_means_not_single_steps():
    reference = [2.0, 1.0] * 10
    other = [2.2, 0.8] * 10  # each step 10-20% off, every 2-step mean equal
    assert train_throughput.curve_gap(reference, other, window=2) == pytest.approx(0.0)
    assert train_throughput.curve_gap(reference, [x * 1.02 for x in reference], window=2) == pytest.approx(0.02)
    assert train_throughput.curve_gap([1.0, 1.0], [1.0, 1.5], window=10) == pytest.approx(0.25)  # window > run


def test_summary_compares_the_half_curve_with_fp32_lorakit():
    runs = [_run(1, "c", 150.0, 1500.0, [1.0] * 20), _run(1, "h", 300.0, 1200.0, [1.0] * 10 + [1.1] * 10)]
    rows = {row["what"]: row for row in train_throughput.summarise(runs, {v: v for v in "ch"})}
    assert rows["h vs c: largest relative gap of the 10-step mean loss"]["median"] == pytest.approx(0.1)


def test_summary_compares_the_default_with_peft_on_the_same_allocator():
    runs = [_run(1, "b", 100.0, 3000.0, [2.0, 1.0]), _run(1, "p", 110.0, 2500.0, [2.0, 1.0]),
            _run(1, "h", 220.0, 1000.0, [2.0, 1.0])]
    rows = {row["what"]: row for row in train_throughput.summarise(runs, {v: v for v in "bph"})}
    assert rows["h / p speed (same round)"]["median"] == pytest.approx(2.0)
    assert rows["h / p peak memory"]["median"] == pytest.approx(0.4)
    assert rows["p / b peak memory"]["median"] == pytest.approx(2500 / 3000)





@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_childs_peak_memory_is_its_own_not_the_spawning_processs():
    """A variant's child spawned by a process holding 1.2 GB reports its own peak (Python with torch imported: a few
    hundred MB), where ru_maxrss starts from the spawner's memory."""
    import subprocess

    import torch

    held = torch.ones(300 << 20)  # 1.2 GB, touched
    script = "import sys; sys.path.insert(0, sys.argv[1]); import results; print(results.peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", script, str(BENCH)], capture_output=True, text=True, timeout=60,
                         check=True)
    assert float(held[-1]) == 1.0
    assert float(out.stdout) < 800, out.stdout
