"""`lorakit export` fed bad input: one line on stderr, exit code 2, and no file (or half a file) left."""

from __future__ import annotations

import errno

import gguf
import pytest
from export_models import tiny_folder

from lorakit.checkpoint.peft_io import save_adapter
from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.lora.inject import inject
from lorakit.models import load_causal_lm


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The one error line (transformers' loading progress bars aside), checked to be the only message."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lorakit")]
    assert len(lines) == 1 and lines[0].startswith("lorakit export: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-cli")
    folder = tiny_folder(root / "llama", "llama")
    model = load_causal_lm(folder)
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, root / "adapter")
    return root, folder


def test_existing_output_is_refused_unless_forced(llama, capsys, tmp_path):
    _, folder = llama
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "--model", folder, "--output", out)
    assert code == 2 and "already exists; pass --force" in one_error_line(err)
    assert out.read_bytes() == b"keep me"
    code, stdout, _ = run_cli(capsys, "--model", folder, "--output", out, "--force", "--outtype", "q8_0")
    assert code == 0 and "wrote" in stdout
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_adapter_of_another_base_is_refused(llama, capsys, tmp_path):
    root, _ = llama
    other = tiny_folder(tmp_path / "gpt2", "gpt2")  # no q_proj/v_proj: the adapter has no place in it
    for fmt in ("gguf", "gguf-lora"):
        code, _, err = run_cli(capsys, "--model", other, "--adapter", root / "adapter", "--format", fmt,
                               "--output", tmp_path / f"{fmt}.gguf")
        assert code == 2, err
        assert "adapter" in one_error_line(err)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*.tmp-*"))


def test_bad_options_are_reported_together(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--format", "onnx", "--outtype", "q4", "--output", tmp_path / "x.gguf")
    line = one_error_line(err)
    assert code == 2 and "--format: given 'onnx'" in line and "--outtype: given 'q4'" in line


def test_full_disk_leaves_no_file(llama, capsys, tmp_path, monkeypatch):
    _, folder = llama
    out = tmp_path / "m.gguf"

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    code, _, err = run_cli(capsys, "--model", folder, "--output", out)
    assert code == 2 and "no space left on device" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_whole_module_adapter_is_refused_for_gguf_lora(capsys, tmp_path):
    folder = tiny_folder(tmp_path / "llama", "llama")
    model = load_causal_lm(folder)
    inject(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(model, tmp_path / "adapter")
    code, _, err = run_cli(capsys, "--model", folder, "--adapter", tmp_path / "adapter", "--format", "gguf-lora",
                           "--output", tmp_path / "a.gguf")
    assert code == 2 and "whole modules (lm_head)" in one_error_line(err)


def test_an_export_never_writes_over_what_it_reads(llama, capsys, tmp_path):
    """Even with --force: not the adapter's own files, not the base file; a new file beside them is fine."""
    import shutil

    root, folder = llama
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "--adapter", adapter, "--model", folder, "--format", "gguf-lora", "--outtype",
                           "f32", "--output", adapter / "adapter_model.safetensors", "--force")
    assert code == 2 and "which this export reads" in one_error_line(err)
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights
    base = tmp_path / "base.gguf"
    assert run_cli(capsys, "--model", folder, "--outtype", "f32", "--output", base)[0] == 0
    before = base.read_bytes()
    code, _, err = run_cli(capsys, "--model", base, "--outtype", "q8_0", "--output", base, "--force")
    assert code == 2 and "which this export reads" in one_error_line(err) and base.read_bytes() == before
    code, _, _ = run_cli(capsys, "--adapter", adapter, "--model", folder, "--format", "gguf-lora", "--outtype", "f32",
                         "--output", adapter / "lora.gguf")
    assert code == 0 and (adapter / "lora.gguf").is_file()


def test_empty_values_and_a_template_a_lora_gguf_cannot_hold_are_refused(llama, capsys, tmp_path):
    root, folder = llama
    for argv, message in [(("--model", folder, "--adapter", ""), "--adapter: empty"),
                          (("--model", folder, "--output", ""), "--output: empty"),
                          (("--adapter", root / "adapter", "--format", "gguf-lora", "--template", "alpaca"),
                           "--template: goes with --format gguf")]:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in one_error_line(err), err
    assert not list(tmp_path.iterdir())


def test_an_ollama_template_it_cannot_hold_leaves_the_earlier_export_whole(llama, capsys, tmp_path):
    _, folder = llama
    out = tmp_path / "m.gguf"
    assert run_cli(capsys, "--model", folder, "--outtype", "f32", "--output", out, "--ollama")[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, err = run_cli(capsys, "--model", folder, "--outtype", "q8_0", "--output", out, "--ollama", "--force",
                           "--template", 'Q: """{instruction}""" A:')
    assert code == 2 and '"""' in one_error_line(err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("module, message", [
    ("lm_head", "LoRA on the output head, which this base ties to its embeddings"),  # its GGUF has no output.weight
    ("embed_tokens", "LoRA on the embeddings, which this base ties to its output head"),  # llama.cpp: on the head too
])
def test_a_lora_on_a_tied_head_or_embedding_is_refused_for_gguf_lora(capsys, tmp_path, module, message):
    folder = tiny_folder(tmp_path / "llama", "llama")  # tied
    model = load_causal_lm(folder)
    inject(model, LoraConfig(r=4, target_modules=["q_proj", module]))
    save_adapter(model, tmp_path / "adapter")
    code, _, err = run_cli(capsys, "--model", folder, "--adapter", tmp_path / "adapter", "--format", "gguf-lora",
                           "--output", tmp_path / "a.gguf")
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("format", ["gguf", "gguf-lora"])
def test_a_base_other_than_the_one_the_adapter_names_is_warned_of(llama, capsys, caplog, tmp_path, format):
    import shutil

    root, folder = llama
    other = shutil.copytree(folder, tmp_path / "other")  # the same shapes: the adapter loads on it
    for model, warned in [(other, True), (f"{folder}/.", False)]:
        caplog.clear()
        code, _, err = run_cli(capsys, "--model", model, "--adapter", root / "adapter", "--format", format,
                               "--outtype", "f32", "--output", tmp_path / "a.gguf", "--force")
        assert code == 0, err
        named = [r.getMessage() for r in caplog.records if "is not the base" in r.getMessage()]
        assert named == ([f"--model {other} is not the base {root / 'adapter'} names ({folder}); exporting the "
                          f"adapter on {other}"] if warned else []), named


def test_a_gguf_named_as_its_modelfile_is_refused(llama, capsys, tmp_path):
    _, folder = llama
    code, _, err = run_cli(capsys, "--model", folder, "--outtype", "f32", "--output", tmp_path / "Modelfile", "--ollama")
    assert code == 2 and "is where --ollama writes the Modelfile" in one_error_line(err)
    assert not list(tmp_path.iterdir())


def test_an_export_never_writes_into_lorakits_cache(llama, capsys, tmp_path, monkeypatch):
    _, folder = llama
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "m" / "model.safetensors").write_bytes(b"weights")
    code, _, err = run_cli(capsys, "--model", folder, "--outtype", "f32", "--force",
                           "--output", tmp_path / "cache" / "models" / "m" / "model.safetensors")
    assert code == 2 and "lies in lorakit's cache" in one_error_line(err)
    assert (tmp_path / "cache" / "models" / "m" / "model.safetensors").read_bytes() == b"weights"


def test_a_folder_that_is_not_a_whole_model_is_one_line(llama, capsys, tmp_path):
    import shutil

    root, folder = llama
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:100])
    for model, message in [(root / "adapter", "cannot load the tokenizer"), (damaged, "cannot load the model")]:
        code, _, err = run_cli(capsys, "--model", model, "--outtype", "f32", "--output", tmp_path / "o.gguf")
        assert code == 2 and message in one_error_line(err), err
    assert not (tmp_path / "o.gguf").exists()


def test_sigterm_mid_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "keep.gguf"
    out.write_bytes(b"the earlier export")
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "export", "--model", "smollm2-135m-instruct",
                                "--outtype", "f32", "--output", str(out), "--force"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".keep.gguf.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the export ended before its file was being written"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err.splitlines() == ["lorakit export: interrupted"], err
    assert out.read_bytes() == b"the earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]
