"""bench/decode_speed.py: llama-batched-bench's decode rate read from its table, ratios within a round, and lorakit's
systems decoding the embedded model."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
decode_speed = importlib.import_module("decode_speed")

TABLE = """
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    64 |     32 |    1 |     96 |    0.119 |   538.47 |    0.568 |    56.36 |    0.687 |   139.82 |
"""


def test_the_decode_rate_is_the_s_tg_column_of_the_prompt_row():
    assert decode_speed.s_tg(TABLE, 64) == pytest.approx(56.36)
    with pytest.raises(StopIteration):
        decode_speed.s_tg(TABLE, 128)


def test_ratios_are_taken_within_a_round():
    runs = [{"rows": 1, "round": k, "system": s, "tok_s": v}
            for k, figures in {1: {"lorakit": 40.0, "llama-f32": 50.0}, 2: {"lorakit": 60.0, "llama-f32": 50.0}}.items()
            for s, v in figures.items()]
    rows = {row["what"]: row for row in decode_speed.summarise(runs)}
    ratio = rows["1 rows: lorakit / llama-f32 (same round)"]
    assert ratio["min"] == pytest.approx(0.8) and ratio["max"] == pytest.approx(1.2)
    assert rows["1 rows: llama-f32 tok/s"]["median"] == pytest.approx(50.0)


def test_an_int8_lorakit_is_also_taken_over_llamas_q8_0():
    figures = {"lorakit": 40.0, "lorakit-w8a8": 60.0, "llama-f32": 50.0, "llama-q8_0": 80.0}
    runs = [{"rows": 1, "round": 1, "system": s, "tok_s": v} for s, v in figures.items()]
    rows = {row["what"]: row for row in decode_speed.summarise(runs)}
    assert rows["1 rows: lorakit-w8a8 / llama-q8_0 (same round)"]["median"] == pytest.approx(0.75)
    assert rows["1 rows: lorakit / llama-q8_0 (same round)"]["median"] == pytest.approx(0.5)
    assert "1 rows: lorakit-w8a8 / llama-f32 (same round)" not in rows


def test_lorakits_systems_decode_the_embedded_model(tmp_path):
    args = argparse.Namespace(model="smollm2-135m-instruct", prompt=8, new_tokens=12, adapters=1, rank=2,
                              quantize="w8a8")
    adapter = tmp_path / decode_speed.make_adapters(args, tmp_path)[0]
    systems = decode_speed.lorakit_systems(args, adapter)
    assert set(systems) == {"lorakit", "lorakit-4k-pages", "lorakit-op-by-op", "lorakit-w8a8"}
    for system in systems.values():
        system(1)  # warm-up, as the bench runs it: the first step times the layouts and loads the kernels
        assert system(1) > 0
