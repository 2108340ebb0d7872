"""Every `lorakit` subcommand given bad arguments and bad files: one `lorakit CMD: error: ...` line,
exit code 2, no traceback, and nothing written outside the command's output.

The listed cases run in-process (the same code path as `python -m lorakit`); Hypothesis then draws
arguments for every subcommand from each one's own flags, with values from a pool of bad paths,
odd numbers and text, and checks the same property (a command the draw happens to make valid may
also succeed, exit 0). Files no process may read are checked in one real process that lacks root's
power to read anything (setpriv); a handful of cases also go through `python -m lorakit` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lorakit
from cli_support import lorakit_process, toy_run_config, tree_fingerprint, write_config
from conftest import TOY_TARGETS, tiny_gpt2
from lorakit.cli import build_parser, main
from lorakit.models import load_causal_lm
from property_support import examples, time_limit

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # every subcommand, as --help lists them


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """One tiny model folder and the good and bad files every case draws from (names -> paths)."""
    root = tmp_path_factory.mktemp("every-command")
    config = toy_run_config(root)
    model = config["model"]
    adapter = lorakit.save_adapter(lorakit.inject(load_causal_lm(model), lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=TOY_TARGETS[:4], base_model_name_or_path=model)), root / "adapter")
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, base_model_name_or_path="other-org/tiny-gpt2"))
    other_rank = Path(shutil.copytree(adapter, root / "adapter-r4"))
    card = json.loads((other_rank / "adapter_config.json").read_text())
    (other_rank / "adapter_config.json").write_text(json.dumps({**card, "r": 4, "lora_alpha": 8}))
    no_config = Path(shutil.copytree(model, root / "model-without-config"))
    (no_config / "config.json").unlink()
    (root / "folder").mkdir()
    (root / "empty.jsonl").write_bytes(b"")
    (root / "bytes.bin").write_bytes(bytes(range(256)) * 4)
    (root / "prompts.jsonl").write_text('{"instruction": "say red", "output": "red red"}\n')
    (root / "predictions.tsv").write_text("MR\toutput\nname[A]\tA.\n")
    (root / "runs").mkdir()
    paths = {
        "model": model, "adapter": str(adapter), "adapter-other-base": str(lorakit.save_adapter(gpt2, root / "gpt2")),
        "adapter-other-rank": str(other_rank), "model-without-config": str(no_config),
        "missing": str(root / "missing"), "folder": str(root / "folder"), "empty": str(root / "empty.jsonl"),
        "bytes": str(root / "bytes.bin"), "under-a-file": str(root / "empty.jsonl" / "child"),
        "data": config["data"]["train_file"], "prompts": str(root / "prompts.jsonl"),
        "predictions": str(root / "predictions.tsv"), "runs": str(root / "runs"),
    }
    paths["config"] = str(write_config(root / "config.yaml", config, train={
        "output_dir": str(root / "scratch" / "run"), "max_steps": 1, "save_strategy": "no"}))
    paths["root"] = str(root)
    return paths


def run_cli(capsys, argv: list[str], world: dict[str, str]) -> tuple[int, str]:
    """`lorakit ARGV` in-process (servers patched to return at once); its exit code and stderr."""
    (Path(world["root"]) / "scratch").mkdir(exist_ok=True)  # where outputs may go
    with time_limit(120):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code if isinstance(stop.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_error_line(command: str, code: int, err: str, *, allow_success: bool = False) -> None:
    """Exit 2 with exactly one `lorakit COMMAND: error:` line and no traceback (or exit 0 if allowed)."""
    assert "Traceback" not in err and "internal error" not in err, err
    if allow_success and code == 0:
        return
    lines = [line for line in err.splitlines() if line.startswith("lorakit")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"lorakit {command}: error: "), (command, code, err)


@pytest.fixture(autouse=True)
def servers_return_at_once(monkeypatch):
    """`serve` and `dashboard` build their app, bind their socket and would then block serving: return instead."""
    from lorakit.cli import listening

    monkeypatch.setattr(listening, "serve_on", lambda app, sock, log_level: sock.close())


# --------------------------------------------------------------------------- listed cases
CASES = {
    "train": [
        ["{missing}"], ["{folder}"], ["{empty}"], ["{bytes}"], ["{under-a-file}"],
        ["{config}", "--model", "{model-without-config}"], ["{config}", "--model", "{missing}"],
        ["{config}", "--data.train_file", "{missing}"], ["{config}", "--data.train_file", "{folder}"],
        ["{config}", "--data.train_file", "{empty}"], ["{config}", "--data.train_file", "{bytes}"],
        ["{config}", "--data.template", "chat"], ["{config}", "--train.lr"], ["{config}", "--nproc", "0"],
        ["{config}", "--train.output_dir", "{under-a-file}"],
    ],
    "generate": [
        ["--model", "{missing}", "--prompt", "p"], ["--model", "{folder}", "--prompt", "p"],
        ["--model", "{model-without-config}", "--prompt", "p"], ["--model", "{bytes}", "--prompt", "p"],
        ["--model", "{model}", "--adapter", "{missing}", "--prompt", "p"],
        ["--model", "{model}", "--adapter", "{folder}", "--prompt", "p"],
        ["--model", "{model}", "--adapter", "{adapter-other-base}", "--prompt", "p"],
        ["--model", "{model}", "--adapter", "{adapter-other-rank}", "--prompt", "p"],
        ["--model", "{model}", "--template", "chat", "--prompt", "p"],
        ["--model", "{model}", "--input", "{missing}", "--output", "{root}/scratch/o.jsonl"],
        ["--model", "{model}", "--input", "{empty}", "--output", "{root}/scratch/o.jsonl"],
        ["--model", "{model}", "--input", "{folder}", "--output", "{root}/scratch/o.jsonl"],
        ["--model", "{model}", "--input", "{prompts}", "--output", "{under-a-file}"],
        ["--model", "{model}", "--input", "{prompts}"], ["--model", "{model}"],
        ["--model", "{model}", "--prompt", "p", "--quantize", "int8", "--load-in-4bit"],
        ["--model", "{model}", "--prompt", "p", "--quantize", "int4"],
        ["--model", "{model}", "--prompt", "p", "--lora-dtype", "fp16"],
        ["--model", "{model}", "--prompt", "p", "--max-new-tokens", "-1"],
        ["--model", "{model}", "--prompt", "p", "--temperature", "-1"],
        ["--model", "{model}", "--prompt", "p", "--temperature", "nan"],
        ["--model", "{model}", "--prompt", "p", "--top-p", "0"],
        ["--model", "{model}", "--prompt", "p", "--batch-size", "0"],
        ["--model", "{model}", "--prompt", "p", "--load-in-4bit", "--load-in-8bit"],
    ],
    "eval": [
        [], ["--model", "{model}"], ["--model", "{model}", "--data", "{missing}"],
        ["--model", "{model}", "--data", "{empty}"], ["--model", "{model}", "--data", "{bytes}"],
        ["--model", "{model}", "--data", "{data}", "--adapter", "{adapter-other-rank}"],
        ["--model", "{model}", "--data", "{data}", "--batch-size", "0"],
        ["--task", "e2e", "--predictions", "{missing}"], ["--task", "e2e", "--predictions", "{folder}"],
        ["--task", "e2e", "--predictions", "{bytes}"], ["--task", "e2e", "--predictions", "{empty}"],
        ["--task", "e2e", "--predictions", "{predictions}", "--references", "{empty}"],
        ["--task", "e2e", "--predictions", "{predictions}", "--references", "{folder}"],
        ["--task", "nope", "--predictions", "{predictions}"],
    ],
    "merge": [
        ["--model", "{model}", "--adapter", "{missing}", "--output", "{root}/scratch/m"],
        ["--model", "{model}", "--adapter", "{adapter-other-base}", "--output", "{root}/scratch/m"],
        ["--model", "{model}", "--adapter", "{adapter-other-rank}", "--output", "{root}/scratch/m"],
        ["--model", "{model-without-config}", "--adapter", "{adapter}", "--output", "{root}/scratch/m"],
        ["--model", "{model}", "--adapter", "{adapter}", "--output", "{under-a-file}"],
        ["--model", "{model}", "--adapter", "{adapter}", "--output", "{empty}"],
        ["--model", "{model}", "--adapter", "{adapter}", "--output", "{root}/scratch/m", "--base-full-precision"],
    ],
    "classify": [
        ["--model", "{model}", "--adapter", "{adapter}", "--text", "good"],
        ["--model", "{model}", "--adapter", "{missing}", "--text", "good"],
        ["--model", "{missing}", "--adapter", "{adapter}", "--text", "good"],
        ["--model", "{model}", "--adapter", "{adapter}", "--input", "{prompts}"],
        ["--model", "{model}", "--adapter", "{adapter}"],
    ],
    "serve": [
        ["--model", "{missing}"], ["--model", "{model-without-config}"],
        ["--model", "{model}", "--adapter", "a={missing}"], ["--model", "{model}", "--adapter", "a={folder}"],
        ["--model", "{model}", "--adapter", "a={adapter-other-base}"],
        ["--model", "{model}", "--adapter", "a={adapter-other-rank}"],
        ["--model", "{model}", "--adapter", "a={adapter}", "--adapter", "a={adapter}"],
        ["--model", "{model}", "--adapter", "../a={adapter}"], ["--model", "{model}", "--adapter", "="],
        ["--model", "{model}", "--port", "-1"], ["--model", "{model}", "--max-batch", "0"],
        ["--model", "{model}", "--port", "http"], ["--model", "{model}", "--quantize", "int4"],
        ["--model", "{model}", "--quantize", "int8", "--half-weights", "bf16"],
        ["--model", "{model}", "--lora-dtype", "fp16"],
    ],
    "inspect": [["{missing}"], ["{folder}"], ["{empty}"], ["{model}"], ["{under-a-file}"], []],
    "export": [
        [], ["--model", "{missing}", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model-without-config}", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model}", "--adapter", "{adapter-other-base}", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model}", "--adapter", "{adapter-other-rank}", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model}", "--outtype", "q3", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model}", "--format", "onnx", "--output", "{root}/scratch/x.gguf"],
        ["--model", "{model}", "--output", "{under-a-file}"], ["--model", "{model}", "--output", "{folder}"],
        ["--adapter", "{missing}", "--format", "gguf-lora", "--output", "{root}/scratch/x.gguf"],
    ],
    "merge-adapters": [
        [],
        ["{adapter}", "{missing}", "--weights", "1", "1", "--output", "{root}/scratch/m"],
        ["{adapter}", "{folder}", "--weights", "1", "1", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter-other-base}", "--weights", "1", "1", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter-other-rank}", "--weights", "1", "1", "--method", "linear", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter}", "--weights", "1", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter}", "--weights", "1", "x", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter}", "--weights", "1", "1", "--method", "sum", "--output", "{root}/scratch/m"],
        ["{adapter}", "{adapter}", "--weights", "1", "1", "--method", "ties", "--density", "0", "--output",
         "{root}/scratch/m"],
        ["{adapter}", "{adapter}", "--weights", "1", "1", "--output", "{under-a-file}"],
        ["{adapter}", "{adapter}", "--weights", "1", "1", "--output", "{root}"],  # a folder that is not empty
    ],
    "mine-preferences": [
        [], ["--model", "{model}", "--data", "{data}"],
        ["--model", "{missing}", "--data", "{data}", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model-without-config}", "--data", "{data}", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--adapter", "{adapter-other-base}", "--data", "{data}", "--output",
         "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{missing}", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{empty}", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{bytes}", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{data}", "--task", "nope", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{data}", "--samples", "0", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{data}", "--temperature", "nan", "--output", "{root}/scratch/p.jsonl"],
        ["--model", "{model}", "--data", "{data}", "--output", "{data}"],  # would overwrite without --force
        ["--model", "{model}", "--data", "{data}", "--output", "{under-a-file}"],
    ],
    "dashboard": [["{missing}"], ["{empty}"], ["{runs}", "--port", "-1"], ["{runs}", "--poll-seconds", "0"]],
}


def _argv(template: list[str], world: dict[str, str]) -> list[str]:
    return [part.format(**world) for part in template]


def test_every_command_has_cases():
    assert sorted(CASES) == COMMANDS


@pytest.mark.parametrize(("command", "template"), [(c, t) for c, ts in CASES.items() for t in ts],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_argument_or_file_is_one_line_with_exit_code_2(world, capsys, command, template):
    before = tree_fingerprint(Path(world["root"]))
    code, err = run_cli(capsys, [command, *_argv(template, world)], world)
    assert_one_error_line(command, code, err)
    after = {k: v for k, v in tree_fingerprint(Path(world["root"])).items() if not k.startswith("scratch/")}
    assert after == {k: v for k, v in before.items() if not k.startswith("scratch/")}


# --------------------------------------------------------------------------- generated arguments
NUMBERS = ["-1", "0", "1", "2", "0.5", "nan", "-inf", "1e999", "99999999999999999999", "x", ""]
PATH_NAMES = ["model", "adapter", "adapter-other-base", "adapter-other-rank", "model-without-config", "missing",
              "folder", "empty", "bytes", "under-a-file", "data", "prompts", "predictions", "runs", "config"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
SKIPPED = {"--interactive", "--nproc", "--device-map", "--help", "-h"}  # stdin; launchers; GPUs only


def _options(command: str) -> list[argparse.Action]:
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return [a for a in parser._actions if not SKIPPED & set(a.option_strings) and a.dest != "debug"]


def _value(action: argparse.Action, world: dict[str, str]) -> st.SearchStrategy:
    if action.choices:
        return st.sampled_from([*action.choices, "nope"])
    if action.type in (int, float):
        return st.sampled_from(NUMBERS)
    scratch = [f"{world['root']}/scratch/out", f"{world['root']}/scratch/o.jsonl"]
    return st.one_of(st.sampled_from([world[n] for n in PATH_NAMES] + scratch), TEXT)


def _arguments(command: str, world: dict[str, str]) -> st.SearchStrategy:
    parts = []
    for action in _options(command):
        if not action.option_strings:  # a positional: always given
            parts.append(_value(action, world).map(lambda v: [v]))
        elif action.nargs == 0:
            parts.append(st.sampled_from([[], [action.option_strings[0]]]))
        else:
            flag = action.option_strings[0]
            given = _value(action, world).map(lambda v, f=flag: [f, v])
            parts.append(given if action.required else st.one_of(st.just([]), given))
    extra = st.just([]) if command != "train" else st.sampled_from(
        [[], ["--train.max_steps", "0"], ["--lora.r", "0"], ["--data.max_length", "-3"], ["--train.lr", "x"]])
    ordered = st.tuples(*parts).flatmap(lambda groups: st.permutations(list(groups)))
    return st.tuples(ordered, extra).map(lambda t: [p for group in t[0] for p in group] + t[1])


@pytest.mark.parametrize("command", COMMANDS)
@examples(0.8)
@given(data=st.data())
def test_generated_arguments_give_one_line_or_success(world, capsys, command, data):
    argv = [command, *data.draw(_arguments(command, world))]
    if command == "train":  # a run that happens to be valid stays one step long
        argv += ["--train.max_steps", "1", "--train.output_dir", f"{world['root']}/scratch/run"]
    before = {k: v for k, v in tree_fingerprint(Path(world["root"])).items() if not k.startswith("scratch/")}
    code, err = run_cli(capsys, argv, world)
    assert_one_error_line(command, code, err, allow_success=True)
    after = {k: v for k, v in tree_fingerprint(Path(world["root"])).items() if not k.startswith("scratch/")}
    assert after == before, argv
    shutil.rmtree(Path(world["root"]) / "scratch", ignore_errors=True)


# --------------------------------------------------------------------------- real processes
UNREADABLE = {
    "train": ["{config}"], "inspect": ["{adapter}"], "dashboard": ["{runs}"],
    "generate": ["--model", "{model}", "--input", "{prompts}", "--output", "{root}/scratch/o.jsonl"],
    "eval": ["--task", "e2e", "--predictions", "{predictions}"],
    "serve": ["--model", "{model}", "--adapter", "a={adapter}"],
    "export": ["--model", "{model}", "--output", "{root}/scratch/x.gguf"],
    "merge": ["--model", "{model}", "--adapter", "{adapter}", "--output", "{root}/scratch/m"],
    "classify": ["--model", "{model}", "--adapter", "{locked}", "--text", "t"],
}
DRIVER = """
import contextlib, io, json, sys
import lorakit.cli.listening
lorakit.cli.listening.serve_on = lambda app, sock, log_level: sock.close()
from lorakit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_unreadable_files_and_folders_in_a_process_that_cannot_read_them(world, tmp_path):
    """chmod 000 on the file or folder each command reads first; root keeps its power to read anything
    unless setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    folder = shutil.copytree(world["adapter"], tmp_path / "locked")
    locked = [world["config"], world["predictions"], world["prompts"], world["runs"], str(folder),
              str(Path(world["adapter"]) / "adapter_config.json"), str(Path(world["model"]) / "config.json")]
    cases = [[c, *_argv(t, {**world, "locked": str(folder)})] for c, t in UNREADABLE.items()]
    command = [sys.executable, "-c", DRIVER, json.dumps(cases)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_READ_SEARCH")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    (Path(world["root"]) / "scratch").mkdir(exist_ok=True)
    modes = {path: os.stat(path).st_mode for path in locked}
    for path in locked:
        os.chmod(path, 0)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for (command_name, _), (code, err) in zip(UNREADABLE.items(), results):
        assert_one_error_line(command_name, code, err)
        assert "Permission denied" in err, (command_name, err)


@pytest.mark.parametrize(("command", "template", "message"), [
    ("train", ["{bytes}"], "byte 0x80 is not valid UTF-8"),
    ("generate", ["--model", "{model}", "--adapter", "{adapter-other-rank}", "--prompt", "p"],
     "weights hold rank 2"),
    ("inspect", ["{folder}"], "adapter_config.json: not found"),
])
def test_through_python_m_lorakit(world, command, template, message):
    proc = subprocess.run(lorakit_process(command, *_argv(template, world)), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len([line for line in lines if line.startswith("lorakit")]) == 1 and message in proc.stderr, proc.stderr
