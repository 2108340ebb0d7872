"""bench/serve_load.py's summary: ratios only between systems that ran, each variant against the plain server."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
serve_load = importlib.import_module("serve_load")


def _run(repeat: int, rate: float, system: str, tok_s: float, ttft_p99: float) -> dict:
    return {"repeat": repeat, "rate": rate, "system": system, "adapters": 16, "tokens_per_s": tok_s,
            "ttft_p99": ttft_p99, "errors": 0}


def test_a_run_without_the_batch_scheduler_or_llama_compares_its_variants_with_the_plain_server():
    runs = [_run(i, rate, system, tok, ttft)
            for i in (1, 2) for rate, ttft in ((4.0, 0.5), (6.0, 1.5 if i == 1 else 2.5))
            for system, tok in (("lorakit-continuous", 100.0 * rate / 4), ("lorakit-continuous-lora-int8", 110.0))]
    args = argparse.Namespace(rate_list=[4.0, 6.0], k_list=[16], ttft_bound=2.0)
    rows = {row["what"]: row for row in serve_load.summarise(runs, args)}
    assert not [what for what in rows if "lorakit-batch" in what or "llama" in what]  # neither ran
    at_bound = rows["lorakit-continuous-lora-int8 K=16 / lorakit-continuous tok/s, each at its highest rate with "
                    "p99 TTFT < 2 s"]
    assert at_bound["min"] == pytest.approx(1.1)  # both kept 4 req/s only (round 2 broke the bound at 6)
    assert rows["lorakit-continuous-lora-int8 K=16 / lorakit-continuous tok/s at 6 req/s"]["median"] == \
        pytest.approx(110 / 150)
