"""The CLI fed bad input: one clear line each, exit code != 0 where the run cannot go on, and the
outputs of an earlier run (its checkpoints and adapter) left byte for byte as they were.

Most cases call `lorakit.cli.main(argv)` in-process (the same code path as `python -m lorakit`,
without a fresh interpreter per case); the read-only folder and SIGINT cases need a real process.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import lorakit
from cli_support import (
    GOOD_LINES,
    assert_intact,
    cli,
    fingerprint,
    lorakit_process,
    toy_run_config,
    write_config,
)
from conftest import tiny_gpt2, tiny_llama
from lorakit.checkpoint.manifest import manifest_problem
from lorakit.checkpoint.resume import list_checkpoints
from lorakit.cli import main


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A tiny model folder and the config of a short run on TOY_TASK (no output_dir yet)."""
    return toy_run_config(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def prior_run(toy, tmp_path_factory) -> Path:
    """A finished run: checkpoints at steps 2 and 4 and the final adapter."""
    run = tmp_path_factory.mktemp("prior") / "run"
    config = write_config(run.parent / "config.yaml", toy, train={"output_dir": str(run)})
    assert main(["train", str(config)]) == 0
    return run


@pytest.fixture
def run_dir(prior_run, tmp_path) -> Path:
    """A copy of the finished run that a bad invocation points at."""
    return Path(shutil.copytree(prior_run, tmp_path / "run"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad-json", GOOD_LINES + '{"instruction": "x", "output": }\n',
         "train.jsonl:9: invalid JSON (Expecting value at column 32); expected one JSON object per line"),
        ("wrong-type", GOOD_LINES + '{"instruction": 5, "output": "x"}\n',
         "train.jsonl:9: field 'instruction' is a number 5 (expected a string)"),
        ("missing-field", GOOD_LINES + '{"instruction": "x"}\n',
         "train.jsonl:9: cannot tell the record format from its fields (instruction); expected instruction+output"),
        ("after-blank-lines-and-bom", "\ufeff\n\n" + GOOD_LINES + "\n\n" + '{"instruction": ["x"], "output": "y"}\n',
         "train.jsonl:13: field 'instruction' is an array ['x'] (expected a string)"),
        ("non-utf8", GOOD_LINES.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
         "train.jsonl:9: byte 0xe9 at column 21 is not valid UTF-8; expected UTF-8 text"),
        ("empty", "", "train.jsonl: no records found (the file is empty or holds only blank lines)"),
        ("only-blank-lines", "\n \n\n", "train.jsonl: no records found"),
    ],
)
def test_malformed_jsonl_is_one_line_naming_file_and_line(toy, run_dir, tmp_path, capsys, name, content, message):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = fingerprint(run_dir)
    config = write_config(
        tmp_path / "config.yaml", toy, data={"train_file": str(data)}, train={"output_dir": str(run_dir)}
    )
    code, lines = cli(capsys, "train", str(config), "--resume")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(f"lorakit train: error: {data}")
    assert_intact(run_dir, before)


def test_examples_longer_than_max_length_are_cut_counted_and_named(toy, tmp_path, capsys, caplog):
    """The run goes on: a long prompt loses its start; a long response its end, with a warning naming it."""
    long_prompt = {"instruction": "say " + "very " * 60 + "red", "output": "red red"}
    long_response = {"instruction": "say red", "output": "red " * 80}
    data = tmp_path / "train.jsonl"
    data.write_text("\ufeff\n" + GOOD_LINES + "\n\n" + json.dumps(long_prompt) + "\n" + json.dumps(long_response) + "\n")
    config = write_config(
        tmp_path / "config.yaml", toy, data={"train_file": str(data), "eval_file": toy["data"]["train_file"],
                                             "eval_size": None},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 1, "save_strategy": "no"},
    )
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        code = main(["train", str(config)])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "data: 10 train / 8 eval examples; 2 truncated, 0 dropped at max_length 64" in out
    assert f"{data}:13: 1 responses were cut at data.max_length=64 and lost their EOS (this one first); " \
        "raise data.max_length so the model learns to stop" in [r.getMessage() for r in caplog.records]


def test_yaml_with_unknown_keys_names_each(toy, tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", {**toy, "optimiser": "adamw"}, train={"schedulr": "cosine"})
    code, lines = cli(capsys, "train", str(config))
    assert code == 2 and len(lines) == 1, lines
    assert re.search(rf"{re.escape(str(config))}:\d+: optimiser: unknown key", lines[0]), lines
    assert re.search(rf"{re.escape(str(config))}:\d+: train.schedulr: unknown key \(did you mean 'scheduler'\?\)",
                     lines[0]), lines


def test_a_config_with_no_training_data_is_refused_before_the_model_loads(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"# nothing set but a model that is not there\nmodel: {tmp_path / 'no-model'}\n")
    expected = "lorakit train: error: data.train_file: not set; give a JSONL/JSON/CSV/TSV file (or data.hf_dataset)"
    code, lines = cli(capsys, "train", str(config))
    assert code == 2 and lines == [expected], lines  # not the missing model: nothing was loaded
    # --nproc 2 replaces its process with torchrun's, so it runs in its own; refused before torchrun starts
    done = subprocess.run(lorakit_process("train", str(config), "--nproc", "2"), capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines() == [expected], done.stderr
    from lorakit.config import RunConfig, TrainConfig
    from lorakit.data.formats import DataError
    from lorakit.run import run

    with pytest.raises(DataError, match="data.train_file: not set"):  # the library's entry point, likewise
        run(RunConfig(model=str(tmp_path / "no-model"), train=TrainConfig(output_dir=str(tmp_path / "runs"))))
    assert not (tmp_path / "runs").exists()


def test_wrong_target_module_names(toy, run_dir, tmp_path, capsys):
    before = fingerprint(run_dir)
    config = write_config(tmp_path / "config.yaml", toy, train={"output_dir": str(run_dir)})
    # asked to replace the finished run: still left as it was, the earlier run is removed only when training begins
    code, lines = cli(capsys, "train", str(config), "--lora.target_modules", "[qproj, vproj]",
                      "--train.overwrite_output_dir", "true")
    assert code == 2 and len(lines) == 1, lines
    assert "matched no module of LlamaForCausalLM; closest names it has: q_proj" in lines[0]
    assert_intact(run_dir, before)


def _foreign_adapter(folder: Path, arch: str) -> Path:
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(r=2, base_model_name_or_path=f"other-org/tiny-{arch}"))
    return lorakit.save_adapter(model, folder)


class Payload:
    """Unpickling this creates a file: the proof that a pickle was (or was not) run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(adapter: Path, how: str, marker: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "pickle-posing-as-safetensors":
        weights.write_bytes(pickle.dumps(Payload(marker)))
    elif how == "pickle-bin-only":
        weights.unlink()
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.parametrize(
    "case, message",
    [
        ("llama-with-other-sizes", "has shape (2, 64) but the model needs (2, 128) (the adapter was trained on "
         "other-org/tiny-llama)"),
        ("gpt2", "does not fit this LlamaForCausalLM (the adapter was trained on other-org/tiny-gpt2): "
         "lora.target_modules"),
        ("truncated", "adapter_model.safetensors: is truncated ("),
        ("pickle-posing-as-safetensors", "adapter_model.safetensors: is a pickle (torch.save) file, not "
         "safetensors; refused, since loading pickle can run code"),
        ("pickle-bin-only", "adapter_model.bin: refusing a pickled adapter (loading pickle can run code)"),
    ],
)
def test_bad_adapters_are_refused_in_one_line(toy, prior_run, tmp_path, capsys, case, message):
    marker = tmp_path / "pickle-ran"
    if case in ("llama-with-other-sizes", "gpt2"):
        adapter = _foreign_adapter(tmp_path / "adapter", case.split("-")[0])
    else:
        adapter = Path(shutil.copytree(prior_run / "adapter", tmp_path / "adapter"))
        _damage(adapter, case, marker)
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    code, lines = cli(capsys, "generate", "--model", toy["model"], "--adapter", str(adapter), "--prompt", "say red")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(f"lorakit generate: error: {adapter}")
    assert not marker.exists(), "the pickle was unpickled"
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == files


def test_resume_skips_a_truncated_checkpoint_for_the_previous_one(toy, run_dir, tmp_path, capsys, caplog):
    latest = run_dir / "checkpoints" / "step-000004"
    _damage(latest, "truncated", tmp_path / "unused")
    config = write_config(tmp_path / "config.yaml", toy, train={"output_dir": str(run_dir)})
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main(["train", str(config), "--resume"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"skipping damaged checkpoint {latest} (adapter_model.safetensors has") for m in messages)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000002'} at step 2" in messages
    assert manifest_problem(latest) is None  # written again, whole, by the resumed run


def test_a_read_only_output_folder_fails_first_and_touches_nothing(toy, run_dir, tmp_path):
    before = fingerprint(run_dir)
    config = write_config(tmp_path / "config.yaml", toy, train={"output_dir": str(run_dir), "max_steps": 6})
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    command = lorakit_process("train", str(config), "--resume")
    if os.geteuid() == 0:  # root writes anywhere; drop the capability that lets it (CAP_DAC_OVERRIDE)
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        for path in [run_dir, *run_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (
        f"lorakit train: error: train.output_dir: cannot write to {run_dir} (Permission denied); "
        "expected a writable folder"
    )
    assert_intact(run_dir, before)


def test_sigint_during_a_save_leaves_every_checkpoint_whole(toy, run_dir, tmp_path):
    config = write_config(
        tmp_path / "config.yaml", toy, train={"output_dir": str(run_dir), "max_steps": 400, "save_total_limit": None}
    )
    # Ctrl-C's default action in the child even when this test runs as a background job (a shell without job
    # control starts those with SIGINT ignored, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen(lorakit_process("train", str(config), "--resume"), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    root, caught, deadline = run_dir / "checkpoints", None, time.time() + 240
    while caught is None and proc.poll() is None and time.time() < deadline:
        temps = [p for p in root.iterdir() if p.name.startswith(".tmp-step-")]
        if temps:
            os.kill(proc.pid, signal.SIGSTOP)  # freeze it, then make sure it is still mid-save
            if temps[0].exists():
                caught = temps[0]
                os.kill(proc.pid, signal.SIGINT)
            os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert caught is not None, "never caught the run during a save"
    lines = [line for line in err.splitlines() if line.startswith("lorakit")]
    good = list_checkpoints(run_dir)
    assert proc.returncode == 130 and lines == [
        f"lorakit train: interrupted; the last complete checkpoint is {good[-1]}; continue with --resume"
    ], err
    assert not caught.exists() and not [p for p in root.iterdir() if p.name.startswith(".")]
    assert all(manifest_problem(p) is None for p in good)  # older ones, and the interrupted one if it landed


def _full_disk(limit_bytes: int):
    """In the child: files may grow to `limit_bytes` only, and writing past it fails (EFBIG), as on a full disk."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def test_a_full_disk_during_a_save_is_one_line_and_earlier_checkpoints_stay_whole(toy, run_dir, tmp_path):
    before = fingerprint(run_dir)
    config = write_config(tmp_path / "config.yaml", toy, train={"output_dir": str(run_dir), "max_steps": 6})
    proc = subprocess.run(
        lorakit_process("train", str(config), "--resume"), capture_output=True, text=True, timeout=300,
        preexec_fn=_full_disk(8_000),  # the config and metrics fit; the step-6 checkpoint's adapter does not
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lorakit train: error: {run_dir / 'checkpoints' / '.tmp-step-000006-'}")
    assert "adapter_model.safetensors: could not be written (" in lines[0] and "File too large" in lines[0]
    assert_intact(run_dir, before)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sigterm_ends_a_lone_run_as_interrupted(toy, tmp_path):
    """A run stopped by SIGTERM (timeout, kill, a job scheduler) ends as Ctrl-C does; its status was left 'running'."""
    from lorakit.track.status import read_status

    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", toy, train={"output_dir": str(run), "max_steps": 400})
    proc = subprocess.Popen(lorakit_process("train", str(config)), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]  # 128 + SIGTERM, told apart from Ctrl-C
    assert "lorakit train: interrupted;" in err and read_status(run)["state"] == "interrupted"
