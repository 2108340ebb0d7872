"""What every bench writes: one JSON file per bench, `runs/bench/<bench>.json`, in one shape.

    {
      "bench": "train_throughput",                   the file's name, without .json
      "title": "Training throughput and MFU",         the heading in docs/benchmarks.md
      "description": "...",                           one paragraph: what is compared, on what
      "command": "python bench/train_throughput.py --steps 50",
      "commit": "1a2b3c4", "dirty": false,            the tree at the start (dirty: uncommitted changes)
      "date": "2025-01-31T12:00:00+00:00",
      "machine": {"cpu": ..., "cores": 2, "torch_threads": 2, "memory_gib": 23.5, "device": "cpu",
                  "torch": "2.13.0", "gemm_gflops": 52.1},  gemm_gflops only where a bench measured it
      "columns": [["variant", "variant"], ["tokens_per_s", "tok/s"], ...],   optional: order and headers
      "runs": [{"repeat": 1, "variant": "a", "tokens_per_s": 42.9, ...}, ...],   every run, never only the best
      "summary": [{"what": "c / b", "min": 1.37, "median": 1.40}, ...],   optional: derived rows
      "notes": ["..."]                                optional: lines printed under the tables
    }

`write_result(...)` fills command, commit, date and machine; a bench passes its runs and summary.
`python bench/report.py` turns every such file into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "runs" / "bench"


def command_line(argv: list[str] | None = None) -> str:
    """How this bench was started, as a user would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else argv[0]
    return shlex.join(["python", shown, *argv[1:]])


def git_state() -> dict:
    """{"commit": short hash or None, "dirty": whether tracked files differ from it}."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "--short=10", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# The tree as the bench started (benches import this module first thing): what the record says ran,
# even when the tree is edited or committed to while a long bench runs.
TREE_AT_START = git_state()


def machine(**measured) -> dict:
    """The machine a bench ran on: CPU model, cores, threads, memory, device; plus `measured` rates."""
    import torch

    info = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(), "device": "cpu", "torch": torch.__version__.split("+")[0],
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    info.update({k: v for k, v in measured.items() if v is not None})
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def host_speed() -> dict:
    """What tells apart hosts that report the same CPU name (cloud hosts do, at up to 2x different speeds): the fp32
    torch.mm rate at 2048^3 on this process's threads, GFLOP/s. Call it on a quiet machine, before the bench."""
    (rate,) = gemm_rates([(2048, 2048, 2048)]).values()
    return {"gemm_gflops_2048": round(rate, 1)}


def gemm_rates(shapes: list[tuple[int, int, int]], seconds: float = 0.3, dtype=None,
               onednn: bool = False) -> dict[tuple[int, int, int], float]:
    """GFLOP/s of torch.mm at each (M, K, N) in `dtype` (default fp32), each timed for about `seconds` after a warm-up.
    `onednn`: an fp32 product's rate is the faster of torch.mm (MKL) and oneDNN's linear op, which ships in the same
    build and which lorakit's training uses where it is faster (lora/onednn_linear.py): the ceiling of either."""
    import torch

    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        rates[(m, k, n)] = _rate(functools.partial(torch.mm, a, b, out=out), 2 * m * k * n, seconds)
        if onednn and a.dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            weight = b.t().contiguous()  # (N, K), a linear layer's weight
            linear = functools.partial(torch.ops.mkldnn._linear_pointwise, a, weight, None, "none", [], "")
            rates[(m, k, n)] = max(rates[(m, k, n)], _rate(linear, 2 * m * k * n, seconds))
    return rates


def _rate(product, flops: int, seconds: float) -> float:
    """GFLOP/s of `product()` over about `seconds` after one untimed call."""
    start = time.perf_counter()
    product()
    warm_up = time.perf_counter() - start
    if warm_up >= seconds:  # a GEMM this slow (fp16 without hardware support) is its own measurement
        return flops / warm_up / 1e9
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        product()
        repeats += 1
    return flops * repeats / (time.perf_counter() - start) / 1e9


def half_rates(shapes: list[tuple[int, int, int]], dtype, fp32_rates: dict) -> dict[tuple[int, int, int], float]:
    """A half type's GFLOP/s at the model's shapes. A type slower than fp32 at the largest shape is timed there
    only: train.half_base auto never picks it, so its peak is no variant's MFU denominator, and a type without
    hardware support (fp16 on a CPU without AVX-512 FP16 or AMX) would take minutes a shape."""
    largest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    rate = gemm_rates([largest], dtype=dtype)[largest]
    if rate < fp32_rates[largest]:
        return {largest: rate}
    rates = gemm_rates(shapes, dtype=dtype)
    return {**rates, largest: max(rate, rates[largest])}


def min_median(values: list[float]) -> dict:
    """{"min", "median", "max", "n"} of a bench's repeated figures."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def write_result(
    bench: str,
    title: str,
    runs: list[dict],
    *,
    description: str = "",
    summary: list[dict] | None = None,
    columns: list[tuple[str, str]] | None = None,
    notes: list[str] | None = None,
    machine_info: dict | None = None,
    out_dir: str | Path | None = None,
    argv: list[str] | None = None,
) -> Path:
    """Write `runs/bench/<bench>.json` (or under `out_dir`) in the shape above; returns its path."""
    record = {
        "bench": bench, "title": title, "description": description, "command": command_line(argv),
        **TREE_AT_START, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info or machine(), "runs": runs,
    }
    if columns:
        record["columns"] = [list(c) for c in columns]
    if summary:
        record["summary"] = summary
    if notes:
        record["notes"] = notes
    path = Path(out_dir or RESULTS_DIR) / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_plain) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def _plain(value):
    """JSON for what json cannot write itself (paths, tuples as keys are the caller's job)."""
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class RssSampler:
    """The largest resident set seen while training, sampled every 20 ms from /proc (Linux)."""

    def __init__(self):
        self.peak = self.start = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"rss_before_training_mb": self.start, "training_peak_rss_mb": self.peak}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, as `lorakit train` reports it (lorakit/process_memory.py: its
    own high-water mark, VmHWM). Imported when called: a bench's parent process need not load torch."""
    from lorakit.process_memory import peak_rss_mb as own_peak

    return own_peak()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def record_name(text: str) -> str:
    """An argparse type for --name: the NAME of a record <bench>_NAME.json kept beside the bench's main one."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", text):
        raise argparse.ArgumentTypeError(f"a record name is lower-case letters, digits, '.' and '-' (got {text!r})")
    return text
