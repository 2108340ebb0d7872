"""The one top-level handler: any exception that escapes a command is one line; --debug adds the traceback.

Exit codes: 2 for bad input, 1 for an internal error (a bug), 130 for Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_support import cli
from lorakit.cli import inspect as inspect_cmd
from lorakit.config import ConfigError


def _raising(err: BaseException):
    def run(args, overrides):
        raise err

    return run


@pytest.mark.parametrize(
    ("err", "code", "line"),
    [
        (ZeroDivisionError("division by zero"), 1,
         "lorakit inspect: internal error: ZeroDivisionError: division by zero (a bug in lorakit; "
         "re-run with --debug for the traceback, and please report it)"),
        (KeyError("messages"), 1, "lorakit inspect: internal error: KeyError: 'messages' (a bug in lorakit;"),
        (RecursionError(), 1, "lorakit inspect: internal error: RecursionError (a bug in lorakit;"),
        (ConfigError("data.max_length: given -1,\n  expected a positive integer"), 2,
         "lorakit inspect: error: data.max_length: given -1, expected a positive integer"),
        (FileNotFoundError(2, "No such file or directory", "x.jsonl"), 2,
         "lorakit inspect: error: [Errno 2] No such file or directory: 'x.jsonl'"),
        (KeyboardInterrupt(), 130, "lorakit inspect: interrupted"),
    ],
)
def test_an_escaping_exception_is_one_line_with_its_exit_code(monkeypatch, capsys, err, code, line):
    monkeypatch.setattr(inspect_cmd, "run", _raising(err))
    got, lines = cli(capsys, "inspect", "somewhere")
    assert got == code and len(lines) == 1 and lines[0].startswith(line), lines
    assert "Traceback" not in capsys.readouterr().err


def test_a_very_long_message_is_cut(monkeypatch, capsys):
    monkeypatch.setattr(inspect_cmd, "run", _raising(ValueError("x" * 100_000)))
    code, lines = cli(capsys, "inspect", "somewhere")
    assert code == 1 and len(lines) == 1 and len(lines[0]) < 1200 and "xxx..." in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_prints_the_traceback(monkeypatch, capsys, where):
    monkeypatch.setattr(inspect_cmd, "run", _raising(ZeroDivisionError("division by zero")))
    argv = ["--debug", "inspect", "somewhere"] if where == "before" else ["inspect", "somewhere", "--debug"]
    from lorakit.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise err' in err
    assert err.rstrip().splitlines()[-1] == (
        "lorakit inspect: internal error: ZeroDivisionError: division by zero (a bug in lorakit, and please report it)")


def test_usage_errors_are_argparse_lines_with_code_2(capsys):
    code, lines = cli(capsys, "inspect")
    assert code == 2 and lines == ["lorakit inspect: error: the following arguments are required: adapter"]
    code, lines = cli(capsys, "generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "many")
    assert code == 2 and lines == [
        "lorakit generate: error: argument --max-new-tokens: given 'many', expected a positive integer"]


@pytest.mark.parametrize("argv", [
    ("eval", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"),
    ("generate", "--model", "m", "--prompt", "p", "--batch-size", "-3"),
    ("mine-preferences", "--model", "m", "--data", "d.jsonl", "--output", "o.jsonl", "--samples", "0"),
    ("merge-adapters", "a", "b", "--weights", "1", "1", "--output", "o", "--svd-rank", "0"),
])
def test_counts_name_their_flag_before_any_model_loads(capsys, argv):
    """A count below 1 is a usage error naming the flag (not a config field), raised while parsing."""
    code, lines = cli(capsys, *argv)
    flag = argv[-2]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"error: argument {flag}: given {int(argv[-1])}, expected a positive integer"), lines


@pytest.mark.parametrize("argv", [
    ("generate", "--model", "m", "--prompt", ""),
    ("generate", "--model", "m", "--input", " ", "--output", "o.jsonl"),
    ("eval", "--model", "", "--data", "d.jsonl"),
    ("classify", "--model", "m", "--adapter", "a", "--text", ""),
    ("merge", "--model", "m", "--adapter", "", "--output", "o"),
    ("mine-preferences", "--model", "m", "--data", "", "--output", "o.jsonl"),
    ("merge-adapters", "a", "", "--output", "o"),
    ("inspect", ""),
    ("train", ""),
    ("serve", "--model", ""),
])
def test_an_empty_path_or_text_names_its_argument_before_any_model_loads(capsys, argv):
    """An empty value used to be the current folder ('.: is a folder') or, for --prompt, an internal error."""
    code, lines = cli(capsys, *argv)
    blank = next(value for value in argv[1:] if not value.strip())
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"given {blank!r}, expected a non-empty value"), lines
    assert f"lorakit {argv[0]}: error: argument " in lines[0], lines


def test_a_real_process_prints_no_traceback(tmp_path):
    """The same through a real process: an internal error planted in a command (--debug is checked in-process)."""
    plant = (
        "import sys; import lorakit.cli.inspect as m\n"
        "def run(args, overrides): return {}['missing']\n"
        "m.run = run\n"
        "from lorakit.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", plant, "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lorakit")]
    assert proc.returncode == 1 and len(lines) == 1 and "internal error: KeyError: 'missing'" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr


def test_inspect_names_a_lora_factor_that_is_not_a_matrix(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    import lorakit
    from conftest import tiny_llama

    lorakit.save_adapter(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    code, lines = cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and lines == [f"lorakit inspect: error: {tmp_path / 'adapter_model.safetensors'}: {key} has shape "
                                   "(); expected a LoRA factor of two dimensions"]


@pytest.mark.parametrize("flag, value, expected", [("--temperature", "-1", "a number >= 0 (0: greedy)"),
                                                   ("--temperature", "nan", "a number >= 0 (0: greedy)"),
                                                   ("--top-p", "0", "a number in (0, 1]"),
                                                   ("--top-p", "many", "a number in (0, 1]")])
def test_generates_sampling_flags_are_named_before_any_model_loads(capsys, flag, value, expected):
    code, lines = cli(capsys, "generate", "--model", "m", "--prompt", "p", flag, value)
    given = repr(value) if value == "many" else value
    assert code == 2 and lines == [f"lorakit generate: error: argument {flag}: given {given}, expected {expected}"]
