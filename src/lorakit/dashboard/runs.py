"""What the dashboard says about a run, derived from its files alone.

Status, honestly: `finished` when summary.json is there; `running` while the process that wrote
status.json still lives (same host), or, without that record or from another host, while
metrics.jsonl changed in the last STALE_SECONDS; otherwise the run ended early and is `resumable`
when it left a complete checkpoint (`lorakit train CONFIG --resume` continues it) and `failed`
when it did not or when it recorded an error.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from lorakit.dashboard.files import first_bytes, plain_json, read_events, read_json, read_yaml
from lorakit.track import flatten
from lorakit.track.samples import SAMPLES_FILE, primary_metric, read_samples
from lorakit.track.status import STATUS_FILE, process_alive
from lorakit.train.metrics import kept_events

STALE_SECONDS = 600
CHECKPOINT_PREFIX = "step-"
LOWER_IS_BETTER = ("loss", "perplexity")


class RunCache:
    """Parsed files kept until their size or modification time changes; metrics.jsonl read on from where the last
    poll stopped."""

    def __init__(self):
        self._entries: dict[tuple[Path, str], tuple[tuple[int, int], object]] = {}
        # path: (inode, bytes read, events, the file's first bytes then)
        self._appended: dict[Path, tuple[int, int, list[dict], bytes]] = {}

    def get(self, path: Path, kind: str, reader):
        try:
            stat = path.stat()
        except OSError:
            self._entries.pop((path, kind), None)
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        hit = self._entries.get((path, kind))
        if hit and hit[0] == stamp:
            return hit[1]
        value = reader(path)
        self._entries[(path, kind)] = (stamp, value)
        return value

    def events(self, path: Path) -> list[dict]:
        """metrics.jsonl's events, reading only the lines appended since the last call: a poll of a long running
        run parses its new steps, not the whole file again. A file replaced (a resume rewrites it atomically),
        shorter than what was read, or whose first bytes changed (a fresh run emptied it in place and wrote past
        the old size between two polls) is read afresh."""
        try:
            stat = path.stat()
            head = first_bytes(path)
        except OSError:
            self._appended.pop(path, None)
            return []
        inode, offset, events, seen = self._appended.get(path, (None, 0, [], b""))
        if inode != stat.st_ino or stat.st_size < offset or not head.startswith(seen):
            offset, events = 0, []
        if stat.st_size > offset:
            new, offset = read_events(path, offset, whole=True)
            events = events + new  # a new list: a request still reading the old one sees it unchanged
        self._appended[path] = (stat.st_ino, offset, events, head[:offset])
        return events


def load_run(name: str, folder: Path, cache: RunCache) -> dict:
    """Everything the page shows of one run: its row in the runs table plus config, checkpoints, summary."""
    config = cache.get(folder / "run_config.yaml", "yaml", read_yaml) or {}
    events = kept_events(cache.events(folder / "metrics.jsonl"))  # a divergence rollback's dropped steps left out
    summary = cache.get(folder / "summary.json", "json", read_json)
    record = cache.get(folder / STATUS_FILE, "json", read_json)
    checkpoints = complete_checkpoints(folder)
    status, detail = run_status(folder, record, summary, checkpoints)
    train_cfg, lora_cfg, eval_cfg = (config.get(k) if isinstance(config.get(k), dict) else {}
                                     for k in ("train", "lora", "eval"))
    train_events = [e for e in events if e.get("kind") == "train"]
    step = max([e["step"] for e in train_events], default=0)
    if summary and isinstance(summary.get("steps"), int):
        step = summary["steps"]
    max_steps = train_cfg.get("max_steps")
    row = {
        "name": name,
        "status": status,
        "status_detail": detail,
        "model": config.get("model") or (summary or {}).get("model"),
        "task": eval_cfg.get("task") or config.get("task"),
        "settings": _key_settings(config, train_cfg, lora_cfg),
        "step": step,
        "total_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else (step if summary else None),
        "last_loss": train_events[-1].get("loss") if train_events else None,
        "best": best_metric(events, _text(train_cfg.get("metric_for_best")) or "eval_loss",
                            train_cfg.get("greater_is_better") if isinstance(train_cfg.get("greater_is_better"), bool)
                            else None),
        "scores": task_scores(summary),
        "tokens_per_s": _median([e.get("tokens_per_s") for e in train_events]),
        "wall_seconds": wall_seconds(folder, record, summary, status),
        "updated": _latest_mtime(folder),
        "has_samples": (folder / SAMPLES_FILE).is_file(),
        "checkpoints": [c["step"] for c in checkpoints],
    }
    return {"row": row, "config": config, "summary": summary, "status_record": record, "checkpoint_list": checkpoints}


def run_status(folder: Path, record: dict | None, summary: dict | None, checkpoints: list[dict]) -> tuple[str, str]:
    """(running | finished | failed | resumable, a line saying why)."""
    if summary is not None:
        return "finished", "summary.json written"
    state = (record or {}).get("state")
    if state == "finished":
        return "finished", "the run reported it finished"
    if state == "running":
        alive = process_alive(record)
        if alive:
            return "running", f"process {record.get('pid')} is training"
        if alive is None and _recent(folder):
            return "running", f"on {record.get('host')}; files updated in the last {STALE_SECONDS // 60} min"
        why = (f"process {record.get('pid')} is gone without reporting an end (killed?)" if alive is False
               else f"no update from {record.get('host')} for over {STALE_SECONDS // 60} min")
    elif state in ("failed", "interrupted"):
        why = record.get("error") or state
    elif _recent(folder):
        return "running", f"metrics.jsonl updated in the last {STALE_SECONDS // 60} min"
    else:
        why = "no summary.json and no recent update"
    last = checkpoints[-1]["step"] if checkpoints else None
    if state == "failed":
        return "failed", why + (f"; last checkpoint: step {last}" if last is not None else "")
    if last is not None:
        return "resumable", f"{why}; continue from step {last} with lorakit train CONFIG --resume"
    return "failed", f"{why}; no checkpoint to resume from"


def complete_checkpoints(folder: Path) -> list[dict]:
    """Checkpoints whose save finished (trainer_state.json and manifest.json present), oldest first.

    Read-only: folders a killed save left (.tmp-step-*) are ignored, not removed, and files are not
    hashed (`lorakit train --resume` checks the manifests).
    """
    root = folder / "checkpoints"
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)]
    except OSError:
        return []
    out = []
    for name in names:
        digits = name[len(CHECKPOINT_PREFIX) :]
        if digits.isdigit() and (root / name / "trainer_state.json").is_file() and (root / name / "manifest.json").is_file():
            out.append({"name": name, "step": int(digits)})
    return sorted(out, key=lambda c: c["step"])


def best_metric(events: list[dict], metric: str, greater: bool | None) -> dict | None:
    """{metric, value, step} of the best eval event by `metric` (lower for losses unless said otherwise)."""
    points = [(e["step"], e[metric]) for e in events if e.get("kind") == "eval" and _number(e.get(metric))]
    if not points:
        return None
    if greater is None:
        greater = not any(word in metric for word in LOWER_IS_BETTER)
    step, value = (max if greater else min)(points, key=lambda p: p[1])
    return {"metric": metric, "value": value, "step": step}


def task_scores(summary: dict | None) -> dict | None:
    """{metric, adapter, base} of the task scorer's first metric from summary.json, or None."""
    adapter = (summary or {}).get("adapter_scores")
    if not isinstance(adapter, dict):
        return None
    metric = next((k for k, v in adapter.items() if isinstance(v, float)), None)
    if metric is None:
        return None
    base = (summary.get("base") or {}).get(metric) if isinstance(summary.get("base"), dict) else None
    return {"metric": metric, "adapter": adapter[metric], "base": base}


def wall_seconds(folder: Path, record: dict | None, summary: dict | None, status: str) -> float | None:
    record = record or {}
    started, ended = record.get("started"), record.get("ended")
    if _number(started) and _number(ended):
        return ended - started
    if status == "running" and _number(started):
        return time.time() - started
    if summary and _number(summary.get("seconds")):
        return summary["seconds"]
    if _number(started):  # ended without saying so: until its files last changed
        return max(0.0, _latest_mtime(folder) - started)
    return None


def sample_rows(folder: Path) -> dict:
    rows = plain_samples(folder)
    return {"metric": primary_metric(rows), "rows": rows}


def plain_samples(folder: Path) -> list[dict]:
    """samples.jsonl's rows as a JSON answer can hold them (a NaN score as null), a damaged file as none."""
    try:
        return [row for row in plain_json(read_samples(folder)) if isinstance(row, dict)]
    except (ValueError, RecursionError):
        return []


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _scores(row: dict, key: str = "adapter_scores") -> dict:
    scores = row.get(key)
    return {k: v for k, v in scores.items() if v is None or isinstance(v, bool | int | float | str)} if isinstance(
        scores, dict) else {}


def compare_samples(runs: dict[str, list[dict]]) -> dict:
    """Rows of 2-3 runs joined on the prompt, those where the runs disagree first.

    Order: the scorer's verdicts differ, then only the outputs differ, then all agree; within each,
    the first run's order. Each row carries the base output from the first run that scored the base.
    """
    names = list(runs)
    metric = next((m for m in (primary_metric(r) for r in runs.values()) if m), None)
    keyed = [{_key(r): r for r in rows} for rows in runs.values()]
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])] if keyed else []
    out = []
    for key in common:
        rows = [table[key] for table in keyed]
        verdicts = [_scores(r).get(metric) for r in rows]
        outputs = [" ".join(str(r.get("adapter") or "").split()) for r in rows]
        kind = "verdict" if len(set(verdicts)) > 1 else "output" if len(set(outputs)) > 1 else "same"
        base = next((r for r in rows if r.get("base") is not None), None)
        out.append({
            "instruction": rows[0].get("instruction"), "reference": rows[0].get("reference"),
            "base": base.get("base") if base else None,
            "base_verdict": _scores(base, "base_scores").get(metric) if base else None,
            "outputs": [r.get("adapter") for r in rows], "verdicts": verdicts, "disagreement": kind,
        })
    rank = {"verdict": 0, "output": 1, "same": 2}
    out.sort(key=lambda r: rank[r["disagreement"]])
    totals = {n: _mean([r["verdicts"][i] for r in out]) for i, n in enumerate(names)}
    counts = {k: sum(r["disagreement"] == k for r in out) for k in rank}
    return {"runs": names, "metric": metric, "rows": out, "common": len(out), "counts": counts, "totals": totals}


def config_diff(a: dict, b: dict) -> list[dict]:
    """Every flattened config key of two runs with both values and whether they differ (a's order, then b's)."""
    flat_a, flat_b = flatten(a or {}), flatten(b or {})
    keys = list(dict.fromkeys([*flat_a, *flat_b]))
    return [{"key": k, "a": flat_a.get(k), "b": flat_b.get(k), "differs": flat_a.get(k) != flat_b.get(k)} for k in keys]


def _key_settings(config: dict, train: dict, lora: dict) -> dict:
    quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    return {
        "r": lora.get("r"), "alpha": lora.get("lora_alpha"), "lr": train.get("lr"),
        "batch": _product(train.get("batch_size"), train.get("grad_accum")),
        "max_steps": train.get("max_steps"), "epochs": train.get("epochs"), "scheduler": train.get("scheduler"),
        "bits": quant.get("bits"),
    }


def _key(row: dict) -> str:
    return str(row.get("prompt") or row.get("instruction"))


def _recent(folder: Path) -> bool:
    return time.time() - _latest_mtime(folder) < STALE_SECONDS


def _latest_mtime(folder: Path) -> float:
    stamps = []
    for name in ("metrics.jsonl", STATUS_FILE, "summary.json", "run_config.yaml"):
        try:
            stamps.append((folder / name).stat().st_mtime)
        except OSError:
            pass
    return max(stamps, default=0.0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _median(values: list) -> float | None:
    numbers = [v for v in values if _number(v)]
    return statistics.median(numbers) if numbers else None


def _mean(values: list) -> float | None:
    numbers = [v for v in values if _number(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _product(a, b) -> int | None:
    return a * (b or 1) if isinstance(a, int) else None
