"""RunLog without training: status.json through a run's life, resuming, rank > 0, a tracker failing mid-run."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from lorakit.config import ConfigError
from lorakit.track import flatten, metric_values
from lorakit.track.runlog import RunLog
from lorakit.track.status import read_status


def test_status_follows_the_run(tmp_path):
    for name in ("ok", "bad", "stop"):
        (tmp_path / name).mkdir()
    log = RunLog(tmp_path / "ok", config={"lora": {"r": 4}})
    with log.running():
        assert not (tmp_path / "ok" / "status.json").exists()  # loading: nothing written yet
        log.open()  # training begins
        assert read_status(tmp_path / "ok")["state"] == "running"
        assert yaml.safe_load((tmp_path / "ok" / "run_config.yaml").read_text()) == {"lora": {"r": 4}}
    assert read_status(tmp_path / "ok")["state"] == "finished"
    with pytest.raises(ValueError), RunLog(tmp_path / "bad").running() as failing:
        failing.open()
        raise ValueError("data.train_file: line 3: expected JSON\nmore")
    record = read_status(tmp_path / "bad")
    assert record["state"] == "failed" and record["error"] == "ValueError: data.train_file: line 3: expected JSON"
    with pytest.raises(KeyboardInterrupt), RunLog(tmp_path / "stop").running() as stopped:
        stopped.open()
        raise KeyboardInterrupt
    assert read_status(tmp_path / "stop")["state"] == "interrupted"


def test_a_run_that_fails_before_training_leaves_the_folders_earlier_run_as_it_was(tmp_path):
    with RunLog(tmp_path, config={"lora": {"r": 8}}).running() as first:
        first.open()
    saved = {name: (tmp_path / name).read_bytes() for name in ("status.json", "run_config.yaml")}
    with pytest.raises(FileNotFoundError), RunLog(tmp_path, config={"lora": {"r": 16}}).running():
        raise FileNotFoundError("data file not found: x.jsonl")  # while loading: before open()
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved


def test_resume_keeps_events_up_to_the_checkpoint_and_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path).open()
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0 / step)
    assert [e["step"] for e in RunLog(tmp_path).open(resume_step=2).events()] == [1, 2]
    silent = RunLog(tmp_path / "rank1", report_to=["tensorboard"], enabled=False).open()
    silent.write(kind="train", step=1, loss=1.0)
    with silent.running():
        pass
    assert not (tmp_path / "rank1").exists()


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from lorakit.track import tensorboard

    log = RunLog(tmp_path, report_to="tensorboard").open()
    monkeypatch.setattr(tensorboard.Tracker, "log_metrics", lambda self, step, values: (_ for _ in ()).throw(OSError("disk full")))
    with caplog.at_level(logging.WARNING):
        log.write(kind="train", step=1, loss=2.0)
        log.write(kind="train", step=2, loss=1.0)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert log.trackers == {} and sum("tensorboard tracker" in r.message for r in caplog.records) == 1


def test_tracker_names_and_flattening():
    assert metric_values({"kind": "eval", "step": 4, "eval_loss": 0.5, "eval_confusion": [[1]], "note": "x"}) == {"eval/loss": 0.5}
    assert metric_values({"kind": "rollback", "step": 7, "lr_factor": 0.1, "in_a_row": 1}) == {
        "rollback/lr_factor": 0.1, "rollback/in_a_row": 1.0}
    assert flatten({"lora": {"r": 8, "rank_pattern": {}}, "model": "m"}) == {"lora.r": 8, "lora.rank_pattern": {}, "model": "m"}


def test_a_tracker_that_cannot_start_on_resume_leaves_the_run_folder_as_it_was(tmp_path):
    with RunLog(tmp_path, config={"lora": {"r": 8}}).running() as first:
        first.open()
        for step in (1, 2, 3):
            first.write(kind="train", step=step, loss=1.0 / step)
    saved = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "status.json", "run_config.yaml")}
    (tmp_path / "tensorboard").write_text("a file where TensorBoard's folder goes")
    with pytest.raises(ConfigError, match="train.report_to: tensorboard could not start"), \
            RunLog(tmp_path, report_to=["tensorboard"], config={"lora": {"r": 8}}).running() as resumed:
        resumed.open(resume_step=2)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved


def _train_losses(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def test_resumed_trackers_hold_each_step_once_and_a_new_one_gets_the_kept_steps(tmp_path, monkeypatch):
    """A stop after step 4 with a checkpoint at step 2: MLflow (which cannot delete points) is not sent steps 3-4
    again, and TensorBoard, first asked for at the resume, gets steps 1-2 from metrics.jsonl."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.track.mlflow import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = RunLog(tmp_path, report_to=["mlflow"]).open()
    for step in (1, 2, 3, 4):
        first.write(kind="train", step=step, loss=1.0 / step)
    first._each("close", "interrupted")  # the process stops here; step-000002 is the last checkpoint
    resumed = RunLog(tmp_path, report_to=["tensorboard", "mlflow"]).open(resume_step=2)
    for step in (3, 4, 5):
        resumed.write(kind="train", step=step, loss=1.0 / step)
    with resumed.running():
        pass
    client = MlflowClient(tracking_uri(tmp_path))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert _train_losses(client, mlrun.info.run_id) == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [
        (step, round(1.0 / step, 6)) for step in (1, 2, 3, 4, 5)]


def test_a_fresh_run_over_an_earlier_one_shows_only_its_own_steps_in_tensorboard(tmp_path):
    """train.overwrite_output_dir: the earlier run's event files stay, but TensorBoard purges their steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for losses in ([3.0, 2.0, 1.0], [5.0, 4.0]):
        with RunLog(tmp_path, report_to=["tensorboard"]).running() as log:
            log.open()
            for step, loss in enumerate(losses, 1):
                log.write(kind="train", step=step, loss=loss)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.0), (2, 4.0)]


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_a_divergence_rollback_leaves_each_tracker_one_point_a_step(tmp_path, monkeypatch):
    """Steps 5-6 (and the eval at 6) are logged, step 7 diverges, the run goes back to step 4 and trains 5-8 again:
    TensorBoard drops the abandoned points, MLflow (which cannot) is not sent steps 5-6 twice, and the curves and
    best scores read the kept timeline while metrics.jsonl keeps the record of both."""
    from mlflow.tracking import MlflowClient

    from lorakit.track.mlflow import tracking_uri
    from lorakit.train.metrics import kept_events

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with RunLog(tmp_path, report_to=["tensorboard", "mlflow"]).running() as log:
        log.open()
        for step in range(1, 7):
            log.write(kind="train", step=step, loss=float(step))
        log.write(kind="eval", step=6, eval_loss=6.5)
        log.write(kind="rollback", step=7, reason="loss is nan", to_step=4, lr_factor=0.1, until_step=24, in_a_row=1)
        for step in range(5, 9):
            log.write(kind="train", step=step, loss=10.0 + step)
        log.write(kind="eval", step=6, eval_loss=16.5)
        log.write(kind="eval", step=8, eval_loss=18.5)
    kept = [(s, float(s) if s <= 4 else 10.0 + s) for s in range(1, 9)]
    assert _scalars(tmp_path / "tensorboard", "train/loss") == kept
    assert _scalars(tmp_path / "tensorboard", "eval/loss") == [(6, 16.5), (8, 18.5)]
    client = MlflowClient(tracking_uri(tmp_path))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss"))
    assert history == [(s, float(s)) for s in range(1, 7)] + [(7, 17.0), (8, 18.0)]
    events = kept_events(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert [(e["step"], e["loss"]) for e in events if e["kind"] == "train"] == kept
    assert [(e["step"], e["eval_loss"]) for e in events if e["kind"] == "eval"] == [(6, 16.5), (8, 18.5)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 14  # the record keeps every event


def test_a_tracker_turned_on_at_a_resume_gets_the_kept_steps_and_an_offline_wandb_run_starts_anew(tmp_path,
                                                                                                   monkeypatch):
    from test_trackers import _wandb_history

    from lorakit.track import remembered_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = RunLog(tmp_path, report_to=["tensorboard"]).open()
    for step in (1, 2, 3, 4):
        first.write(kind="train", step=step, loss=1.0 / step)
    first._each("close", "interrupted")
    ids = []
    for resume, stop in ((2, 5), (4, 6)):  # W&B first asked for at the first resume, then resumed itself
        resumed = RunLog(tmp_path, report_to=["tensorboard", "wandb"]).open(resume_step=resume)
        for step in range(resume + 1, stop + 1):
            resumed.write(kind="train", step=step, loss=1.0 / step)
        with resumed.running():
            pass
        ids.append(remembered_id(tmp_path, "wandb"))
    assert ids[0] != ids[1]  # W&B cannot resume an offline run: the second attempt is a run of its own
    (folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{ids[1]}")
    (records,) = folder.glob("run-*.wandb")
    assert sorted(int(r["global_step"]) for r in _wandb_history(records) if "train/loss" in r) == [1, 2, 3, 4, 5, 6]


def test_mlflow_takes_a_config_whose_keys_are_patterns_and_closes_a_run_it_drops(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lorakit.track import mlflow as tracker
    from lorakit.track.mlflow import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"lora": {"r": 4, "rank_pattern": {"q_proj$": 2}, "alpha_pattern": {"model.layers.0.q_proj": 8}}}
    log = RunLog(tmp_path, report_to=["mlflow"], config=config).open()
    assert list(log.trackers) == ["mlflow"]  # not dropped at log_config
    client = MlflowClient(tracking_uri(tmp_path))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    params = mlrun.data.params
    assert json.loads(params["lora.rank_pattern"]) == {"q_proj$": 2} and params["lora.r"] == "4"
    assert json.loads(params["lora.alpha_pattern"]) == {"model.layers.0.q_proj": 8}
    monkeypatch.setattr(tracker.Tracker, "log_metrics", lambda self, step, values: 1 / 0)
    log.write(kind="train", step=1, loss=1.0)
    assert log.trackers == {} and client.get_run(mlrun.info.run_id).info.status == "FAILED"  # not left RUNNING


def test_a_tracker_failing_at_a_resume_leaves_the_tensorboard_record_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with RunLog(tmp_path, report_to=["tensorboard"]).running() as first:
        first.open()
        for step in (1, 2, 3, 4):
            first.write(kind="train", step=step, loss=float(step))
    files = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    with pytest.raises(ConfigError, match="train.report_to: mlflow could not start"):
        RunLog(tmp_path, report_to=["tensorboard", "mlflow"]).open(resume_step=2)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == files
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [(s, float(s)) for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("uri, said", [
    ("http://127.0.0.1:9", "mlflow could not start"),  # nothing listens there: named in seconds, not minutes
    ("sqlite:///{tmp}/mlflow.db", "needs SQLAlchemy, which mlflow-skinny does not install; pip install mlflow"),
])
def test_an_mlflow_store_that_cannot_start_is_named_at_once(tmp_path, monkeypatch, uri, said):
    import importlib.util
    import time

    if "sqlite" in uri and importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("SQLAlchemy is installed: a SQLite store starts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=said):
        RunLog(tmp_path / "run", report_to=["mlflow"]).open()
    assert time.monotonic() - started < 60


def test_a_wandb_setting_it_refuses_is_named_with_its_field(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match=r"wandb could not start \(1 validation error for Settings: mode: Input "
                                          r"should be 'online', 'offline'"):
        RunLog(tmp_path, report_to=["wandb"]).open()


def test_a_fresh_run_over_an_earlier_one_removes_what_would_read_as_its_own(tmp_path):
    for name in ("samples.jsonl", "curves.png", "trackers.json", "summary.json"):
        (tmp_path / name).write_text("the earlier run's")
    RunLog(tmp_path, replace=True).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "status.json"]


def test_a_resume_between_a_rollback_and_its_divergence_keeps_the_rollback(tmp_path):
    """Steps 4-6 logged, a rollback at step 7 to step 3, step 4 again, a checkpoint there (a time budget), a resume:
    the abandoned step 4 must stay marked, or the curves read two values for it."""
    from lorakit.train.metrics import kept_events

    log = RunLog(tmp_path).open()
    for step in (1, 2, 3, 4, 5, 6):
        log.write(kind="train", step=step, loss=float(step))
    log.write(kind="rollback", step=7, reason="loss is nan", to_step=3, lr_factor=0.1, until_step=23, in_a_row=1)
    log.write(kind="train", step=4, loss=40.0)
    resumed = RunLog(tmp_path).open(resume_step=4)
    resumed.write(kind="train", step=5, loss=50.0)
    kept = [(e["step"], e["loss"]) for e in kept_events(resumed.events()) if e["kind"] == "train"]
    assert kept == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
