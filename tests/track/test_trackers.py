"""Trackers for real: a tiny training run logs to TensorBoard, MLflow and W&B (offline), and what each
one stored, read back through its own reader, equals metrics.jsonl at every step."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder
from lorakit.cli import main
from lorakit.config_loading import load_run_config
from lorakit.run import run
from lorakit.track import metric_values
from lorakit.track.samples import read_samples
from lorakit.track.status import read_status

STEPS = 12


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("track")
    model = toy_model_folder(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK * 4))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK))
    config = {
        "model": str(model),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "eval.jsonl"), "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "eval_strategy": "steps",
                  "eval_steps": 4, "save_strategy": "steps", "save_steps": 6, "progress": False},
        "eval": {"task": "ros2", "max_new_tokens": 8, "batch_size": 8},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tracked_run(toy_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "run"
    config = load_run_config(toy_config, ["--train.output_dir", str(out),
                                          "--train.report_to", "[tensorboard, mlflow, wandb]"])
    run(config, echo=lambda *a, **k: None)
    return out


def expected_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from metrics.jsonl, under the trackers' names."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        for tag, value in metric_values(event).items():
            series[tag][event["step"]] = value
    return dict(series)


def test_metrics_jsonl_has_every_step_and_the_task_scores(tracked_run):
    series = expected_series(tracked_run)
    assert sorted(series["train/loss"]) == list(range(1, STEPS + 1))
    assert sorted(series["eval/loss"]) == [4, 8, 12]
    assert sorted(series["eval/exact_match"]) == [0, STEPS]  # base at step 0, adapter at the end
    assert sorted(series["train/grad_norm"]) == list(range(1, STEPS + 1))  # as HF's Trainer logs it
    assert all(value > 0 for value in series["train/grad_norm"].values())


def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = expected_series(tracked_run)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        stored = {e.step: e.value for e in events.Scalars(tag)}
        assert stored.keys() == by_step.keys(), tag
        for step, value in by_step.items():  # TensorBoard keeps float32
            assert stored[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    texts = events.Tags()["tensors"]
    assert {"config/text_summary", "eval_samples/text_summary"} <= set(texts)


def test_mlflow_run_equals_metrics_jsonl(tracked_run):
    from mlflow.tracking import MlflowClient

    from lorakit.track.mlflow import tracking_uri

    client = MlflowClient(tracking_uri(tracked_run))
    experiment = client.get_experiment_by_name("lorakit")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    expected = expected_series(tracked_run)
    assert set(mlrun.data.metrics) == set(expected)
    for tag, by_step in expected.items():
        stored = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, tag)}
        assert stored == by_step, tag
    params = mlrun.data.params
    assert params["lora.r"] == "4" and params["train.lr"] == "0.005" and params["eval.task"] == "ros2"
    adapter = {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter and "adapter/adapter_config.json" in adapter
    table = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "eval_samples.json")).read_text())
    assert len(table["data"]) == len(TOY_TASK) and "adapter" in table["columns"]


def test_wandb_offline_writes_its_run_folder_with_the_same_history(tracked_run):
    (folder,) = (tracked_run / "wandb").glob("offline-run-*")
    (records,) = folder.glob("run-*.wandb")
    history = _wandb_history(records)
    expected = expected_series(tracked_run)
    for tag, by_step in expected.items():
        stored = {int(row["global_step"]): row[tag] for row in history if tag in row}
        assert stored == pytest.approx(by_step), tag


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run: its records, parsed with wandb's own protobuf classes.

    A .wandb file is a 7-byte header (':W&B', 0xBEE1, version) then LevelDB's log format: 32 KiB
    blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left in this block for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += -pos % 32768
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_the_run_files_are_readable_by_others_as_the_umask_allows(tracked_run):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for name in ("run_config.yaml", "samples.jsonl", "status.json", "summary.json", "metrics.jsonl", "trackers.json"):
        assert stat.S_IMODE((tracked_run / name).stat().st_mode) == 0o666 & ~mask, name


def test_samples_and_status_of_the_run(tracked_run):
    rows = read_samples(tracked_run)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in TOY_TASK]
    assert all(r["base"] is not None and set(r["adapter_scores"]) == {"exact_match", "valid_rate"} for r in rows)
    summary = json.loads((tracked_run / "summary.json").read_text())
    adapter_exact = sum(r["adapter_scores"]["exact_match"] for r in rows) / len(rows)
    assert adapter_exact == pytest.approx(summary["adapter_scores"]["exact_match"])  # rows agree with the total
    assert "rows" not in summary["adapter_scores"] and "rows" not in summary["base"]
    status = read_status(tracked_run)
    assert status["state"] == "finished" and status["ended"] >= status["started"]


def test_a_tracker_not_installed_is_one_line_with_its_pip_install(toy_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails as if it were not installed
    out = tmp_path / "run"
    code = main(["train", str(toy_config), "--train.output_dir", str(out), "--train.report_to", "[tensorboard, mlflow]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "pip install mlflow" in err and "tensorboard" not in err.split("report_to")[1]
    assert not out.exists()  # failed before writing anything


def test_unknown_tracker_names_the_choices(toy_config, tmp_path, capsys):
    code = main(["train", str(toy_config), "--train.output_dir", str(tmp_path / "r"), "--train.report_to", "comet"])
    err = capsys.readouterr().err
    assert code == 2 and "train.report_to: given 'comet'" in err and "tensorboard, mlflow, wandb" in err
