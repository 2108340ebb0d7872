"""samples.jsonl: every held-out prompt of a run with the base model's and the adapter's output and the
task scorer's verdict on each, one JSON object per line:

    {"id": 0, "instruction": "...", "prompt": "...", "reference": "...",
     "base": "...", "base_scores": {"exact_match": 0.0, ...},
     "adapter": "...", "adapter_scores": {"exact_match": 1.0, ...}}

`base` and `base_scores` are null when the run did not score the base (`eval.compare_base: false`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.atomic_files import write_atomically

SAMPLES_FILE = "samples.jsonl"


def paired_rows(adapter_rows: list[dict], base_rows: list[dict] | None = None) -> list[dict]:
    """Join the per-row results of scoring the adapter and the base on the same records (same order)."""
    base_rows = base_rows or [None] * len(adapter_rows)
    out = []
    for i, (row, base) in enumerate(zip(adapter_rows, base_rows)):
        out.append({
            "id": i, "instruction": row["instruction"], "prompt": row["prompt"], "reference": row["reference"],
            "base": base["prediction"] if base else None, "base_scores": base["scores"] if base else None,
            "adapter": row["prediction"], "adapter_scores": row["scores"],
        })
    return out


def write_samples(run_dir: str | Path, rows: list[dict]) -> Path:
    """Write samples.jsonl in one rename, so a reader never sees half of it."""
    path = Path(run_dir) / SAMPLES_FILE
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_samples(run_dir: str | Path) -> list[dict]:
    """The rows of samples.jsonl (lines that do not parse are skipped); [] when there is none."""
    path = Path(run_dir) / SAMPLES_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, data) of the rows for a tracker's table: prompt, reference, outputs, primary verdicts."""
    metric = primary_metric(rows)
    columns = ["instruction", "reference", "base", "adapter"]
    if metric:
        columns += [f"base_{metric}", f"adapter_{metric}"]
    data = []
    for r in rows:
        line = [r.get("instruction"), _text(r.get("reference")), r.get("base"), r.get("adapter")]
        if metric:
            line += [(r.get("base_scores") or {}).get(metric), (r.get("adapter_scores") or {}).get(metric)]
        data.append(line)
    return columns, data


def primary_metric(rows: list[dict]) -> str | None:
    """The task scorer's first metric (exact_match for ros2, bleu for e2e): the verdict shown per row."""
    for r in rows:
        scores = r.get("adapter_scores")
        if isinstance(scores, dict) and scores:
            return next(iter(scores))
    return None


def _text(value) -> str:
    return " | ".join(map(str, value)) if isinstance(value, list) else str(value)
