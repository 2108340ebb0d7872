"""checkpoint/run_folder.py: what an output folder already holds, and when a run may write there."""

from __future__ import annotations

import pytest

from lorakit.checkpoint.run_folder import check_output_dir, clear_earlier_run, held
from lorakit.config import ConfigError, TrainConfig


def checkpoint(run, name: str) -> None:
    (run / "checkpoints" / name).mkdir(parents=True)
    (run / "checkpoints" / name / "trainer_state.json").write_text("{}")


def test_only_results_and_checkpoints_count(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)  # empty: a save that never happened
    (run / "metrics.jsonl").write_text("")  # the logs of a run that failed early
    (run / "status.json").write_text('{"state": "failed"}')
    checkpoint(run, "step-000002-backup")  # not one of the run's own
    assert held(run) == []
    check_output_dir(TrainConfig(output_dir=str(run)))
    checkpoint(run, "step-000004")
    assert held(run) == ["checkpoints (the newest step-000004)"]
    check_output_dir(TrainConfig(output_dir=str(run), resume=True))
    with pytest.raises(ConfigError, match="--resume continues its checkpoints"):
        check_output_dir(TrainConfig(output_dir=str(run)))


def test_a_resume_into_a_folder_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for folder in (tmp_path / "misspelt", tmp_path / "empty"):
        with pytest.raises(ConfigError, match=r"^train.resume: .* holds no checkpoint to continue"):
            check_output_dir(TrainConfig(output_dir=str(folder), resume=True))


def test_a_finished_run_without_checkpoints_cannot_be_resumed_over(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError) as refused:
        check_output_dir(TrainConfig(output_dir=str(run), resume=True))
    assert str(refused.value) == (
        f"train.resume: {run} holds no checkpoint to continue ({run / 'checkpoints'} has none); train without "
        "--resume to start it")
    with pytest.raises(ConfigError) as refused:
        check_output_dir(TrainConfig(output_dir=str(run)))
    assert str(refused.value) == (
        f"train.output_dir: {run} holds a finished run (summary.json) and a trained adapter (adapter/); another "
        "train.output_dir keeps it, train.overwrite_output_dir: true replaces it")
    check_output_dir(TrainConfig(output_dir=str(run), overwrite_output_dir=True))
    checkpoint(run, "step-000002")
    clear_earlier_run(run)
    assert held(run) == [] and not (run / "adapter").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("name", ["checkpoints", "adapter"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_file_where_the_run_keeps_a_folder_is_refused_before_anything_loads(tmp_path, name, resume):
    (tmp_path / name).write_text("hi")
    with pytest.raises(ConfigError, match=f"{tmp_path / name} is a file where the run keeps its {name} folder"):
        check_output_dir(TrainConfig(output_dir=str(tmp_path), resume=resume))
