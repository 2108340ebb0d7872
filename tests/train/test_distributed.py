"""Data parallel for real: 2 CPU processes (gloo) under torchrun and accelerate launch against 1 process.

Each run is a real `python -m lorakit train` on a tiny model folder; the same config (global batch
4 = batch_size 2 x processes x grad_accum) gives grad_accum 2 on one process and 1 on two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorakit import allocator
from lorakit.track.status import read_status
from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores
LORAKIT = ["-m", "lorakit", "train"]


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory) -> Path:
    """20 steps, global batch 4 (29 examples: every epoch ends in a step of one example), eval and checkpoint every 10."""
    root = tmp_path_factory.mktemp("ddp")
    model = toy_model_folder(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (TOY_TASK * 4)[:29]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK[:7]))  # uneven shards
    config = {
        "model": str(model),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TOY_TARGETS},
        "data": {
            "train_file": str(root / "train.jsonl"),
            "eval_file": str(root / "eval.jsonl"),
            "max_length": 64,
        },
        "train": {
            "max_steps": 20,
            "batch_size": 2,
            "global_batch_size": 4,
            "lr": 5e-3,
            "warmup_ratio": 0.1,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 10,
            "save_strategy": "steps",
            "save_steps": 10,
            "progress": False,
            "ddp_timeout": 60,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def one_process(toy_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _train([sys.executable, *LORAKIT], toy_config, out)
    return out


def _train(launcher: list[str], config: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [*launcher, str(config), "--train.output_dir", str(out), *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> tuple[list[float], list[float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if e["kind"] == "train"]
    evals = [e["eval_loss"] for e in events if e["kind"] == "eval"]
    assert len(train) == 20 and len(evals) == 2  # rank 0 alone wrote, each step once
    return train, evals


def _assert_same_run(a: Path, b: Path) -> None:
    (train_a, eval_a), (train_b, eval_b) = _losses(a), _losses(b)
    assert max(abs(x - y) for x, y in zip(train_a, train_b)) <= 1e-4, (train_a, train_b)
    assert max(abs(x - y) for x, y in zip(eval_a, eval_b)) <= 1e-4
    assert train_a[-1] < 0.8 * train_a[0]  # it learned: not two equal runs that both did nothing
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def _assert_tensorboard_equals_metrics(folder: Path, run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    stored = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    logged = [(e["step"], e["loss"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if e["kind"] == "train"]
    assert [s for s, _ in stored] == [s for s, _ in logged] == list(range(1, 21))
    assert [v for _, v in stored] == pytest.approx([v for _, v in logged], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun_equal_one(toy_config, one_process, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _train([*torchrun, *LORAKIT], toy_config, tmp_path / "two", "--train.report_to", "tensorboard")
    _assert_same_run(one_process, tmp_path / "two")
    # torchrun's workers start as `python -m lorakit train` and re-execute on lorakit's allocator too
    assert read_status(tmp_path / "two")["allocator"] == ("system" if allocator.library("auto") is None else "tcmalloc")
    (events,) = (tmp_path / "two" / "tensorboard").iterdir()  # rank 0 alone logged to the tracker
    _assert_tensorboard_equals_metrics(events.parent, tmp_path / "two")
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-000020" / "trainer_state.json").read_text())
    assert (state["global_batch"], state["processes"]) == (4, 2)


def test_two_processes_under_accelerate_launch_equal_one(toy_config, one_process, tmp_path):
    # accelerate's --cpu runs one process; --multi_gpu hands N processes to torchrun, and on a
    # machine without CUDA lorakit then joins them with gloo.
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    _train([*accelerate, *LORAKIT], toy_config, tmp_path / "acc")
    _assert_same_run(one_process, tmp_path / "acc")


def test_a_killed_rank_stops_the_run_and_one_process_resumes_it(toy_config, tmp_path):
    out = tmp_path / "killed"
    longer = ["--train.max_steps", "30"]  # time to kill it after its first checkpoint
    proc = subprocess.Popen(
        [sys.executable, *LORAKIT, str(toy_config), "--nproc", "2", "--train.output_dir", str(out), *longer],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = out / "checkpoints" / "step-000010"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    rank1 = _worker_with_rank(proc.pid, 1)
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=90)
    assert time.time() - killed_at < 60  # the gloo connection drops at once; torchrun ends the rest
    assert proc.returncode != 0 and not (out / "adapter").exists(), "the run was not stopped mid-way"
    # rank 0 sees the dropped connection (or, if torchrun's SIGTERM comes first, says that) in one line
    message = [
        line for line in stderr.splitlines() if line.startswith("lorakit train: error: rank 0 stopped:")
    ]
    assert message and "--resume" in message[0], stderr[-3000:]

    _train([sys.executable, *LORAKIT], toy_config, out, *longer, "--resume")  # 1 process: grad_accum 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == list(range(1, 31))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (a child of the launcher, which exec'd into torchrun)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if parent == launcher_pid and f"\0RANK={rank}\0".encode() in b"\0" + environ:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def test_fewer_examples_than_processes_trains_and_evaluates(toy_config, tmp_path):
    """One training and one eval example on two processes: rank 1 trains on a weight-0 stand-in and
    evaluates an empty shard; the run still learns and evaluates like one process."""
    (tmp_path / "one.jsonl").write_text(json.dumps(TOY_TASK[0]) + "\n")
    shorter = ["--data.train_file", str(tmp_path / "one.jsonl"), "--data.eval_file", str(tmp_path / "one.jsonl"),
               "--train.max_steps", "4", "--train.eval_steps", "2", "--train.save_steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _train([*torchrun, *LORAKIT], toy_config, tmp_path / "two", *shorter)
    _train([sys.executable, *LORAKIT], toy_config, tmp_path / "one", *shorter)
    runs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    losses = [[(e["kind"], e.get("loss", e.get("eval_loss"))) for e in events] for events in runs]
    assert [kind for kind, _ in losses[1]] == ["train"] * 2 + ["eval"] + ["train"] * 2 + ["eval"]
    assert [v for _, v in losses[1]] == pytest.approx([v for _, v in losses[0]], abs=1e-4)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_the_time_budget_stops_every_rank_at_the_same_step(toy_config, tmp_path):
    """Rank 0 starts later than rank 1 (it opens the trackers), so each rank's clock reaches train.max_minutes at
    another step; they stop together, and the last step is evaluated and saved."""
    out = tmp_path / "budget"
    _train([*TORCHRUN, *LORAKIT], toy_config, out, "--train.max_steps", "5000", "--train.max_minutes", "0.05",
           "--train.eval_steps", "5000", "--train.save_steps", "5000", "--train.report_to", "mlflow")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = max(e["step"] for e in events if e["kind"] == "train")
    assert last < 5000 and [e["step"] for e in events if e["kind"] == "eval"] == [last]
    assert (out / "checkpoints" / f"step-{last:06d}").is_dir() and read_status(out)["state"] == "finished"


def test_a_tracker_that_cannot_start_stops_every_rank_with_one_line(toy_config, tmp_path):
    out = tmp_path / "no-tracker"
    proc = subprocess.run([*TORCHRUN, *LORAKIT, str(toy_config), "--train.output_dir", str(out),
                           "--train.report_to", "mlflow"], env={**ENV, "MLFLOW_TRACKING_URI": "bogus://nowhere"},
                          capture_output=True, text=True, timeout=300, check=False)
    said = [line for line in proc.stderr.splitlines() if line.startswith("lorakit train: error:")]
    assert proc.returncode != 0 and "lost contact" not in proc.stderr, proc.stderr[-3000:]
    # rank 0 names the tracker; rank 1 points to it, unless torchrun stopped it first when rank 0 ended
    assert sum("train.report_to: mlflow could not start" in line for line in said) == 1, proc.stderr[-3000:]
    assert all("train.report_to: mlflow could not start" in line
               or "train.report_to: a tracker could not start on rank 0" in line for line in said), said
    assert not (out / "status.json").exists()  # the run never began


@pytest.mark.parametrize("extra, said", [
    (["--train.lr", "-1"], "train.lr: given -1.0"),
    (["--train.global_batch_size", "6"], "train.global_batch_size: given 6, expected a multiple of batch_size 2 x 2 "
                                         "processes = 4"),
])
def test_a_bad_config_with_nproc_is_one_line_before_any_process_starts(toy_config, tmp_path, extra, said):
    proc = subprocess.run([sys.executable, *LORAKIT, str(toy_config), "--nproc", "2", "--train.output_dir",
                           str(tmp_path / "run"), *extra], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit train: error: ") and said in lines[0], lines
    assert not (tmp_path / "run").exists()
