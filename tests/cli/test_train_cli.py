"""`lorakit train` end to end on a tiny model: a real process, killed five times and resumed; config errors."""

from __future__ import annotations

import json
import shutil
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorakit.checkpoint.manifest import manifest_problem
from lorakit.checkpoint.resume import list_checkpoints
from lorakit.cli import main
from cli_support import cli, toy_run_config, tree_fingerprint, write_config
from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder


def lorakit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny model folder, data files and a config that checkpoints every 10 steps."""
    root = tmp_path_factory.mktemp("toy")
    model = toy_model_folder(root / "model")
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK * 8))
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK))
    config = {
        "model": str(model),
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": TOY_TARGETS},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file), "max_length": 64},
        "train": {
            "max_steps": 300, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.1, "eval_strategy": "steps",
            "eval_steps": 10, "save_strategy": "steps", "save_steps": 10, "save_total_limit": 3, "progress": False,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _events(run_dir: Path) -> list[dict]:
    """metrics.jsonl as written so far (a line being appended may be cut: skip it)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _final_eval_loss(run_dir: Path, steps: int, every: int) -> float:
    evals = [e for e in _events(run_dir) if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == list(range(every, steps + 1, every))  # each eval logged once
    return evals[-1]["eval_loss"]


def _kill_at_step(proc: subprocess.Popen, log: Path, step: int, extra_s: float) -> None:
    """SIGKILL once this process has done `step` (and at least one step), plus a random delay.

    Progress is read from the process's own progress bar in `log`, not from metrics.jsonl, which
    still holds the steps an earlier attempt logged past its last checkpoint.
    """
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        # the training bar's counts only: the model's "Loading weights" bar ends at 21/21 before any step ran
        done = [int(n) for n in re.findall(r"train: [^|]*\|[^|]*\| *(\d+)/\d+ \[", log.read_text(errors="replace"))]
        if done and max(done) >= max(step, done[0] + 1):
            break
        time.sleep(0.01)
    time.sleep(extra_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_during_save(proc: subprocess.Popen, run_dir: Path) -> Path:
    """SIGKILL while a checkpoint is being written; return the temporary folder it leaves."""
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        root = run_dir / "checkpoints"
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
        # this process's temporary folder, not one an earlier attempt left behind
        temps = [root / n for n in names if n.startswith(".tmp-step-") and n.endswith(f"-{proc.pid}")]
        if temps:
            os.kill(proc.pid, signal.SIGSTOP)  # frozen: is the save still under way?
            if temps[0].exists():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return temps[0]
            os.kill(proc.pid, signal.SIGCONT)
    raise AssertionError("the run never reached a checkpoint write")


def _newest_whole(run_dir: Path) -> Path | None:
    whole = [p for p in list_checkpoints(run_dir) if manifest_problem(p) is None]
    return whole[-1] if whole else None


@pytest.mark.slow
def test_five_sigkills_at_random_moments_resume_to_the_same_adapter(toy_run, tmp_path):
    steps, every = 40, 10
    short = ["--train.max_steps", str(steps), "--train.save_steps", "4", "--train.eval_steps", str(every),
             "--train.logging_steps", "1"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(lorakit_cmd("-v", "train", str(toy_run), "--train.output_dir", str(whole), *short), check=True)

    rng = random.Random(7)
    targets = sorted(rng.sample(range(3, steps - 10), 4))
    moments = [(t, rng.uniform(0.0, 0.05)) for t in targets]
    moments.insert(2, "during a save")
    expected, logs = [], []  # the checkpoint each resume must take: the newest one that is whole
    for i, moment in enumerate(moments):
        if i:
            expected.append(_newest_whole(broken))
        log = tmp_path / f"attempt-{i}.log"
        logs.append(log)
        args = ("--resume",) if i else ()
        with log.open("w") as err:
            proc = subprocess.Popen(
                lorakit_cmd("-v", "train", str(toy_run), "--train.output_dir", str(broken), *short, *args,
                            "--train.progress", "true"),  # the bar tells this attempt's step
                stderr=err,
            )
            if moment == "during a save":
                half = _kill_during_save(proc, broken)
                assert half.is_dir() and not (half / "manifest.json").exists()  # a half-written checkpoint
            else:
                _kill_at_step(proc, log, *moment)
        assert not (broken / "adapter").exists(), f"attempt {i} finished before its kill"

    expected.append(_newest_whole(broken))
    final_log = tmp_path / "final.log"
    with final_log.open("w") as err:
        subprocess.run(lorakit_cmd("-v", "train", str(toy_run), "--train.output_dir", str(broken), *short, "--resume"),
                       stderr=err, check=True)
    resumed = [re.search(r"resumed from (\S+) at step", p.read_text()) for p in [*logs[1:], final_log]]
    assert [Path(m.group(1)) if m else None for m in resumed] == expected
    assert not [p for p in (broken / "checkpoints").iterdir() if p.name.startswith(".")]

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert abs(_final_eval_loss(broken, steps, every) - _final_eval_loss(whole, steps, every)) <= 1e-6
    assert len(list((broken / "checkpoints").iterdir())) <= 3  # save_total_limit, the best included


@pytest.mark.parametrize(
    "override, message",
    [
        (["--train.lr", "fast"], "train.lr: given 'fast', expected float"),
        (["--train.schedulr", "cosine"], "train.schedulr: unknown key (did you mean 'scheduler'?)"),
        (["--lora.r", "0"], "lora.r: given 0, expected a positive integer"),
        (["--lora.target_modules", "[qq_proj]"], "matched no module of LlamaForCausalLM; closest names it has: q_proj"),
    ],
)
def test_config_errors_are_one_clear_line(toy_run, tmp_path, override, message):
    proc = subprocess.run(
        lorakit_cmd("train", str(toy_run), "--train.output_dir", str(tmp_path / "run"), *override),
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("half", ["bf16", "off"])
def test_the_summary_says_which_fast_paths_the_run_took(tmp_path, half):
    """summary.json's lean_path: the half type the frozen base took (None: fp32) and the fused pieces."""
    config = write_config(tmp_path / "config.yaml", toy_run_config(tmp_path),
                          train={"output_dir": str(tmp_path / "run"), "half_base": half, "max_steps": 1})
    assert main(["train", str(config)]) == 0
    lean = json.loads((tmp_path / "run" / "summary.json").read_text())["lean_path"]
    assert lean["half_base"] == (None if half == "off" else half)
    assert lean["fused_rotary"] is True and lean["fused_norms"] > 0


def test_the_run_reports_its_peak_memory(tmp_path, capsys):
    """summary.json's peak_rss_mb is this process's high-water mark at the end of training, also printed."""
    from lorakit.process_memory import peak_rss_mb

    config = write_config(tmp_path / "config.yaml", toy_run_config(tmp_path),
                          train={"output_dir": str(tmp_path / "run"), "max_steps": 1})
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["peak_rss_mb"] <= peak_rss_mb() + 1 and "peak_gpu_mb" not in summary
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("trained 1 step in "))
    assert f"(peak memory {summary['peak_rss_mb'] / 1024:.2f} GiB)" in line, line


def test_a_run_that_fails_while_loading_leaves_the_folders_finished_run_as_it_was(tmp_path):
    config = write_config(tmp_path / "config.yaml", toy_run_config(tmp_path),
                          train={"output_dir": str(tmp_path / "run"), "max_steps": 1})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    saved = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(config), "--data.train_file", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["train", str(config), "--train.seed", "-1"]) == 2
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved


def test_a_fresh_run_never_writes_over_an_earlier_one_unasked(tmp_path, capsys):
    """Refused before loading (the folder byte for byte as it was); --resume continues it; overwrite_output_dir
    replaces it, its old checkpoints removed when training begins."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", toy_run_config(tmp_path), train={"output_dir": str(run)})
    assert main(["train", str(config), "--train.max_steps", "2"]) == 0
    before = tree_fingerprint(run)
    code, lines = cli(capsys, "train", str(config))
    assert code == 2 and lines == [
        f"lorakit train: error: train.output_dir: {run} holds a finished run (summary.json) and a trained adapter "
        "(adapter/) and checkpoints (the newest step-000002); --resume continues its checkpoints, another "
        "train.output_dir keeps it, train.overwrite_output_dir: true replaces it"]
    assert tree_fingerprint(run) == before
    for setting, value in [("--train.lr", "0.05"), ("--lora.lora_alpha", "16"), ("--data.max_length", "32")]:
        code, lines = cli(capsys, "train", str(config), "--resume", setting, value)
        assert code == 2 and len(lines) == 1 and f"written with {setting[2:]} " in lines[0], lines
    train_file = tmp_path / "train.jsonl"
    edited = train_file.with_name("edited.jsonl")
    edited.write_text(train_file.read_text() + train_file.read_text().splitlines()[0] + "\n")
    code, lines = cli(capsys, "train", str(config), "--resume", "--data.train_file", str(edited))
    assert code == 2 and "written with data.train_file contents (sha256) " in lines[0], lines
    assert tree_fingerprint(run) == before
    moved = shutil.copy(train_file, tmp_path / "moved.jsonl")  # the same data elsewhere: the same run
    assert main(["train", str(config), "--resume", "--data.train_file", str(moved)]) == 0  # on to max_steps 4
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]
    assert main(["train", str(config), "--train.overwrite_output_dir", "true", "--train.max_steps", "3",
                 "--train.save_steps", "3"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_moved_run_resumes_with_its_own_best_and_damage_is_named(tmp_path, capsys):
    """The best checkpoint is kept by name, so a run folder moved between runs resumes from and keeps its own; a
    copy of a checkpoint under another name, a half-written last metrics line: passed over; checkpoints none of
    which checks out: a one-line refusal, not a fresh start over them."""
    first = tmp_path / "first"
    config = write_config(tmp_path / "config.yaml", toy_run_config(tmp_path), train={
        "output_dir": str(first), "eval_strategy": "steps", "eval_steps": 2, "save_total_limit": 1})
    assert main(["train", str(config), "--train.max_steps", "2"]) == 0
    (first / "summary.json").unlink()
    shutil.rmtree(first / "adapter")  # as if stopped after its step-2 checkpoint
    moved = first.rename(tmp_path / "moved")
    shutil.copytree(moved / "checkpoints" / "step-000002", moved / "checkpoints" / "step-000002-backup")
    with (moved / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"kind": "train", "loss": 5.03, "lr"')  # what a kill mid-write leaves
    assert main(["train", str(config), "--train.output_dir", str(moved), "--resume"]) == 0
    summary = json.loads((moved / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).parent == moved / "checkpoints" and summary["steps"] == 4
    state = json.loads((list_checkpoints(moved)[-1] / "trainer_state.json").read_text())
    assert state["best_checkpoint"] in ("step-000002", "step-000004")
    assert all(json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines())
    for checkpoint in list_checkpoints(moved):
        (checkpoint / "optimizer.pt").write_bytes(b"damaged")
    before = tree_fingerprint(moved)
    code, lines = cli(capsys, "train", str(config), "--train.output_dir", str(moved), "--resume",
                      "--train.max_steps", "6")
    assert code == 2 and len(lines) == 1 and "train.resume: no checkpoint in" in lines[0], lines
    assert "step-000004: " in lines[0] and tree_fingerprint(moved) == before


@pytest.mark.parametrize("argv, said", [
    (["--load-in-4bit", "--quantization.bits", "8"], "--load-in-4bit and --quantization.bits both set the base's bits"),
    (["--resume"], "holds no checkpoint to continue"),  # a misspelt output_dir would quietly start afresh
])
def test_flags_that_contradict_or_find_nothing_are_one_line(toy_run, tmp_path, capsys, argv, said):
    code, lines = cli(capsys, "train", str(toy_run), "--train.output_dir", str(tmp_path / "new"), *argv)
    assert code == 2 and len(lines) == 1 and said in lines[0], lines
    assert not (tmp_path / "new").exists()
