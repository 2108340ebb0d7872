"""docs/benchmarks.md from the benches' JSON: the shape bench/results.py writes, the page bench/report.py makes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import results.py as a sibling module, as `python bench/x.py` does
report = importlib.import_module("report")
results = importlib.import_module("results")

RUNS = [
    {"repeat": 1, "variant": "a", "tokens_per_s": 42.91, "mfu": 0.01234, "peak_rss_mb": 7012.4, "losses": [1.0, 0.5]},
    {"repeat": 1, "variant": "c", "tokens_per_s": 278.8, "mfu": 0.0812, "peak_rss_mb": 1930.0, "losses": [1.0, 0.4]},
]


def _write(tmp_path: Path, bench: str = "train_throughput", **extra) -> Path:
    return results.write_result(
        bench, f"{bench} title", RUNS, description="What it compares.", out_dir=tmp_path,
        machine_info=results.machine(gemm_gflops=52.13), argv=[str(BENCH / f"{bench}.py"), "--steps", "8"], **extra,
    )


def test_written_record_has_command_commit_machine_date_and_every_run(tmp_path):
    record = json.loads(_write(tmp_path).read_text())
    assert record["command"] == "python bench/train_throughput.py --steps 8"
    assert len(record["commit"]) == 10 and isinstance(record["dirty"], bool)
    assert record["machine"]["cores"] >= 1 and record["machine"]["gemm_gflops"] == 52.13
    assert record["machine"]["cpu"] and record["date"].startswith("20")
    assert record["runs"] == RUNS
    assert report.load_result(tmp_path / "train_throughput.json") == record


def test_page_has_a_section_per_bench_with_every_run(tmp_path):
    _write(tmp_path, "sst2")
    _write(tmp_path, columns=[("variant", "variant"), ("tokens_per_s", "real tok/s"), ("mfu", "MFU")],
           summary=[{"what": "c / a", **results.min_median([6.5, 6.1])}], notes=["a note"])
    page = report.render(report.collect(tmp_path))
    assert page.index("## train_throughput title") < page.index("## sst2 title")  # ORDER, not file names
    assert "| command | `python bench/train_throughput.py --steps 8` |" in page
    assert "gemm_gflops 52.13" in page and " cores" in page
    assert "| variant | real tok/s | MFU |" in page
    assert "| a | 42.91 | 0.012 |" in page and "| c | 278.8 | 0.081 |" in page
    assert "| c / a | 6.100 | 6.300 | 6.500 | 2 |" in page
    assert "- a note" in page
    sst2 = page[page.index("## sst2 title"):]  # no columns given: every scalar key, lists left out
    assert "| repeat | variant | tokens_per_s | mfu | peak_rss_mb |" in sst2 and "losses" not in sst2


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "not readable JSON"), ('{"bench": "x"}', "field 'title' missing"),
     ('{"bench": "x", "title": "t", "command": "c", "machine": {}, "runs": [1]}', "'runs' must be a list of objects")],
)
def test_a_malformed_file_is_named_and_left_out(tmp_path, content, message):
    _write(tmp_path)
    (tmp_path / "broken.json").write_text(content)
    warnings: list[str] = []
    records = report.collect(tmp_path, warn=warnings.append)
    assert [r["bench"] for r in records] == ["train_throughput"]
    assert len(warnings) == 1 and "broken.json" in warnings[0] and message in warnings[0]


def test_cells_are_readable():
    assert [report.fmt(v) for v in (None, True, 12, 123456, 0.0, 0.000123, 3.14159, 42.123, 512.44, 12345.6)] == [
        "", "yes", "12", "123,456", "0.000", "0.000123", "3.142", "42.12", "512.4", "12,346"]
    assert report.fmt("a|b") == "a\\|b"


def test_command_line_regenerates_and_checks(tmp_path):
    _write(tmp_path)
    out = tmp_path / "benchmarks.md"
    command = [sys.executable, str(BENCH / "report.py"), "--results", str(tmp_path), "--output", str(out)]
    assert subprocess.run([*command, "--check"], capture_output=True, check=False).returncode == 1  # not written yet
    subprocess.run(command, check=True, capture_output=True)
    assert out.read_text().startswith("# Benchmarks")
    assert subprocess.run([*command, "--check"], capture_output=True, check=False).returncode == 0
    (tmp_path / "sst2.json").write_text((tmp_path / "train_throughput.json").read_text().replace(
        '"bench": "train_throughput"', '"bench": "sst2"'))
    assert subprocess.run([*command, "--check"], capture_output=True, check=False).returncode == 1  # a new result: stale page


def test_gemm_rates_time_each_shape():
    rates = results.gemm_rates([(64, 64, 64), (32, 128, 16)], seconds=0.02)
    assert set(rates) == {(64, 64, 64), (32, 128, 16)} and all(rate > 0 for rate in rates.values())


def test_an_fp32_rate_with_onednn_is_the_faster_of_both_kernels(monkeypatch):
    timed = []
    real = results._rate
    monkeypatch.setattr(results, "_rate", lambda product, flops, seconds: timed.append(flops) or real(product, flops,
                                                                                                      seconds))
    shapes = [(64, 64, 64), (32, 128, 16)]
    results.gemm_rates(shapes, seconds=0.02)
    assert len(timed) == 2  # torch.mm only
    timed.clear()
    rates = results.gemm_rates(shapes, seconds=0.02, onednn=True)
    assert len(timed) == 4 and all(rate > 0 for rate in rates.values())  # both kernels at each shape
    timed.clear()
    results.gemm_rates(shapes, seconds=0.02, dtype=torch.bfloat16, onednn=True)
    assert len(timed) == 2  # a half type: torch.mm only


def test_the_host_speed_goes_into_the_machine_line():
    speed = results.host_speed()
    assert list(speed) == ["gemm_gflops_2048"] and speed["gemm_gflops_2048"] > 0
    line = report.machine_line(results.machine(**speed))
    assert f"measured: gemm_gflops_2048 {report.fmt(speed['gemm_gflops_2048'])}" in line


def test_record_names_the_tree_as_the_bench_started(tmp_path, monkeypatch):
    # A long bench outlives edits and commits made meanwhile: the record keeps the tree it started on.
    monkeypatch.setattr(results, "TREE_AT_START", {"commit": "0123456789", "dirty": False})
    monkeypatch.setattr(results, "git_state", lambda: {"commit": "fedcba9876", "dirty": True})
    record = json.loads(_write(tmp_path).read_text())
    assert (record["commit"], record["dirty"]) == ("0123456789", False)


def test_a_benchs_named_records_follow_its_own(tmp_path):
    for bench in ("serve_throughput_qwen2.5-1.5b", "serve_load", "serve_throughput", "train_throughput", "zzz"):
        _write(tmp_path, bench)
    page = report.render(report.collect(tmp_path))
    order = ["train_throughput", "serve_throughput", "serve_throughput_qwen2.5-1.5b", "serve_load", "zzz"]
    positions = [page.index(f"## {bench} title") for bench in order]
    assert positions == sorted(positions)


def test_a_half_type_slower_than_fp32_is_timed_at_the_largest_shape_only(monkeypatch):
    timed = []

    def rates(shapes, dtype=None):
        timed.append(list(shapes))
        return {shape: 5.0 if dtype is not None else 100.0 for shape in shapes}

    monkeypatch.setattr(results, "gemm_rates", rates)
    shapes = [(8, 64, 64), (8, 256, 64), (8, 64, 32)]
    fp32 = rates(shapes)
    timed.clear()
    assert results.half_rates(shapes, "half", fp32) == {(8, 256, 64): 5.0} and timed == [[(8, 256, 64)]]
    fast = {shape: 1.0 for shape in shapes}  # fp32 slower than the half type: every shape is timed
    timed.clear()
    assert results.half_rates(shapes, "half", fast) == dict.fromkeys(shapes, 5.0) and timed == [[(8, 256, 64)], shapes]
