"""What the dashboard derives from run folders: status from the files alone, half-written files, sample joins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lorakit.dashboard.files import contained_file, find_runs, read_events
from lorakit.dashboard.runs import RunCache, compare_samples, config_diff, load_run
from lorakit.track.status import read_status, write_status


def _status(folder) -> tuple[str, str]:
    row = load_run(folder.name, folder, RunCache())["row"]
    return row["status"], row["status_detail"]


def _checkpoint(folder, step: int, complete: bool = True):
    path = folder / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / "manifest.json").write_text("{}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(folder, seconds: float) -> None:
    for path in folder.iterdir():
        if path.is_file():
            os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_finished_when_summary_json_is_there(tmp_path):
    (tmp_path / "summary.json").write_text('{"steps": 10}')
    assert _status(tmp_path)[0] == "finished"


def test_running_while_the_recorded_process_lives(tmp_path):
    write_status(tmp_path, "running")  # this process: alive
    assert _status(tmp_path) == ("running", f"process {os.getpid()} is training")


def test_a_killed_run_is_resumable_from_its_checkpoint_or_failed_without_one(tmp_path):
    write_status(tmp_path, "running")
    record = read_status(tmp_path)
    record["pid"] = _dead_pid()
    (tmp_path / "status.json").write_text(json.dumps(record))
    status, detail = _status(tmp_path)
    assert status == "failed" and "is gone" in detail and "no checkpoint" in detail
    _checkpoint(tmp_path, 20, complete=False)  # a save cut short does not count
    assert _status(tmp_path)[0] == "failed"
    _checkpoint(tmp_path, 10)
    status, detail = _status(tmp_path)
    assert status == "resumable" and "step 10" in detail and "--resume" in detail


def test_a_reused_pid_is_not_the_run(tmp_path):
    write_status(tmp_path, "running")
    record = read_status(tmp_path)
    record["process_start"] -= 1  # same pid, another start time: the run's process is gone
    (tmp_path / "status.json").write_text(json.dumps(record))
    assert _status(tmp_path)[0] == "failed"


def test_a_recorded_error_is_failed_even_with_a_checkpoint(tmp_path):
    _checkpoint(tmp_path, 10)
    write_status(tmp_path, "failed", error="DivergenceError: training diverged at step 12")
    status, detail = _status(tmp_path)
    assert status == "failed" and detail.startswith("DivergenceError") and "last checkpoint: step 10" in detail


def test_an_interrupted_run_with_a_checkpoint_is_resumable(tmp_path):
    _checkpoint(tmp_path, 10)
    write_status(tmp_path, "interrupted", error="interrupted")
    assert _status(tmp_path)[0] == "resumable"


def test_another_host_or_no_record_goes_by_how_recent_the_files_are(tmp_path):
    record = {"state": "running", "pid": 1, "host": socket.gethostname() + "-elsewhere", "started": time.time()}
    (tmp_path / "status.json").write_text(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    assert _status(tmp_path)[0] == "running"
    _age(tmp_path, 3600)
    assert _status(tmp_path)[0] == "failed"
    (tmp_path / "status.json").unlink()  # a run folder from before status.json
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    assert _status(tmp_path)[0] == "running"
    _age(tmp_path, 3600)
    assert _status(tmp_path)[0] == "failed"


def test_half_written_files_read_as_what_they_hold(tmp_path):
    (tmp_path / "run_config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "summary.json").write_text('{"steps": ')
    (tmp_path / "status.json").write_text('{"state": "runn')
    (tmp_path / "metrics.jsonl").write_bytes(
        b'{"kind": "train", "step": 1, "loss": 2.0}\nnot json\n{"kind": "train", "step": 2, "loss": 1.5}\n'
        b'\xff\xfe\n{"kind": "train", "step": 3, "lo'
    )
    data = load_run("x", tmp_path, RunCache())
    assert data["config"] == {} and data["summary"] is None
    assert data["row"]["step"] == 2 and data["row"]["last_loss"] == 1.5 and data["row"]["status"] == "running"
    events, offset = read_events(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [1, 2]
    with (tmp_path / "metrics.jsonl").open("ab") as fh:  # the line is finished
        fh.write(b'ss": 1.25}\n')
    more, _ = read_events(tmp_path / "metrics.jsonl", offset)
    assert more == [{"kind": "train", "step": 3, "loss": 1.25}]


def test_the_runs_row_reads_the_timeline_a_divergence_rollback_kept(tmp_path):
    events = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 7)]
    events += [{"kind": "eval", "step": 6, "eval_loss": 0.1},  # dropped with steps 5-7 by the rollback to step 4
               {"kind": "rollback", "step": 7, "to_step": 4, "reason": "loss is nan"},
               {"kind": "train", "step": 5, "loss": 2.9}, {"kind": "train", "step": 6, "loss": 2.8},
               {"kind": "eval", "step": 6, "eval_loss": 2.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    row = load_run("x", tmp_path, RunCache())["row"]
    assert row["best"] == {"metric": "eval_loss", "value": 2.7, "step": 6} and row["last_loss"] == 2.8


def test_a_poll_parses_only_what_was_appended_and_a_replaced_file_afresh(tmp_path, monkeypatch):
    """The runs table follows a running run by reading metrics.jsonl on from where the last poll stopped; a
    resume's atomic rewrite (a new file) or a shorter file is read from the start."""
    import lorakit.dashboard.runs as runs

    path = tmp_path / "metrics.jsonl"
    offsets = []
    real_read = runs.read_events

    def read_events(p, offset=0, whole=False):  # the real reader, noting where each read starts
        offsets.append(offset)
        return real_read(p, offset, whole)

    def line(step, loss):
        return json.dumps({"kind": "train", "step": step, "loss": loss}) + "\n"

    monkeypatch.setattr(runs, "read_events", read_events)
    path.write_text(line(1, 2.0) + line(2, 1.5) + '{"kind": "train", "st')
    cache = RunCache()
    assert load_run("x", tmp_path, cache)["row"]["step"] == 2
    first_end = len((line(1, 2.0) + line(2, 1.5)).encode())
    with path.open("a") as fh:
        fh.write('ep": 3, "loss": 1.25}\n' + line(4, 1.0))
    row = load_run("x", tmp_path, cache)["row"]
    assert (row["step"], row["last_loss"]) == (4, 1.0) and offsets == [0, first_end]
    assert load_run("x", tmp_path, cache)["row"]["step"] == 4 and len(offsets) == 2  # unchanged: nothing read
    replacement = tmp_path / "metrics.new"
    replacement.write_text(line(1, 2.0))
    os.replace(replacement, path)  # a resume truncating the log to its checkpoint, atomically
    assert load_run("x", tmp_path, cache)["row"]["step"] == 1 and offsets[-1] == 0
    path.write_text("")  # the same file, emptied
    assert load_run("x", tmp_path, cache)["row"]["step"] == 0
    path.write_text(line(1, 2.0) + line(2, 0.01))
    assert load_run("x", tmp_path, cache)["row"]["last_loss"] == 0.01
    with path.open("r+") as fh:  # a fresh run over the folder: emptied in place, then past the old size, unpolled
        fh.truncate(0)
        fh.write(line(1, 9.0) + line(2, 8.0) + line(3, 7.0))
    row = load_run("x", tmp_path, cache)["row"]
    assert (row["step"], row["last_loss"]) == (3, 7.0) and offsets[-1] == 0  # read afresh, not appended to


def test_find_runs_keeps_to_the_root(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    for folder in (root / "a", root / "sweep" / "b", outside / "c"):
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("")
    (root / "a" / "checkpoints").mkdir()
    (root / "data").mkdir()  # no run marker: not a run
    (root / "link").symlink_to(outside / "c")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "metrics.jsonl").write_text("")
    assert sorted(find_runs(root)) == ["a", "sweep/b"]
    (outside / "secret.txt").write_text("secret")
    (root / "a" / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "a" / "notes.txt").write_text("fine")
    run = root / "a"
    assert contained_file(root, run, "notes.txt") == run / "notes.txt"
    for bad in ("leak.txt", "../../outside/secret.txt", str(outside / "secret.txt"), "checkpoints", "", ".", "..",
                "sub/../../secret.txt", "..\\..\\outside\\secret.txt", "notes.txt\0.png"):
        assert contained_file(root, run, bad) is None, bad


def test_compare_puts_verdict_disagreements_first_then_output_ones():
    def rows(outputs, verdicts):
        return [{"id": i, "instruction": f"p{i}", "prompt": f"P{i}", "reference": f"r{i}", "base": "b", "base_scores": {"exact_match": 0.0},
                 "adapter": o, "adapter_scores": {"exact_match": v}} for i, (o, v) in enumerate(zip(outputs, verdicts))]

    a = rows(["x", "r1", "same", "y"], [0.0, 1.0, 0.0, 0.0])
    b = rows(["x", "zz", "same", "q"], [0.0, 0.0, 0.0, 0.0])[:4]
    b.append({"id": 9, "prompt": "only-b", "instruction": "only-b", "adapter": "-", "adapter_scores": {"exact_match": 1.0}})
    result = compare_samples({"a": a, "b": b})
    assert [r["instruction"] for r in result["rows"]] == ["p1", "p3", "p0", "p2"]
    assert [r["disagreement"] for r in result["rows"]] == ["verdict", "output", "same", "same"]
    assert result["common"] == 4 and result["counts"] == {"verdict": 1, "output": 1, "same": 2}
    assert result["totals"] == {"a": pytest.approx(0.25), "b": 0.0} and result["metric"] == "exact_match"


def test_config_diff_marks_each_changed_key():
    a = {"lora": {"r": 8, "target_modules": ["q", "v"]}, "train": {"lr": 1e-3}}
    b = {"lora": {"r": 4, "target_modules": ["q", "v"]}, "train": {"lr": 1e-3, "seed": 1}}
    diff = {r["key"]: r for r in config_diff(a, b)}
    assert [k for k, r in diff.items() if r["differs"]] == ["lora.r", "train.seed"]
    assert diff["train.seed"]["a"] is None and diff["lora.r"]["b"] == 4
