"""`lorakit merge`: the merged model in a new folder, written whole; never over the base, a non-empty folder only with
--force; a damaged run card is one line."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.models import load_causal_lm
from cli_support import cli
from conftest import TOY_TARGETS, perturb, toy_model_folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    folder = toy_model_folder(root / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    perturb(model)
    lorakit.save_adapter(model, root / "adapter")
    return folder, root / "adapter"


def _merge(toy, output, *extra):
    folder, adapter = toy
    return main(["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(output), *extra])


def test_the_output_is_never_the_base_and_a_full_folder_needs_force(toy, tmp_path, capsys):
    folder, adapter = toy
    base = (folder / "model.safetensors").read_bytes()
    assert _merge(toy, folder) == 2
    assert _merge(toy, folder, "--force") == 2
    assert "which this command reads; name a new folder" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == base

    out = tmp_path / "merged"
    assert _merge(toy, out) == 0
    first = load_file(out / "model.safetensors")
    (out / "note.txt").write_text("kept?")
    assert _merge(toy, out) == 2
    assert "already holds files" in capsys.readouterr().err and (out / "note.txt").exists()
    assert _merge(toy, out, "--force") == 0  # replaced whole: the old folder's files are gone
    assert not (out / "note.txt").exists()
    assert all((load_file(out / "model.safetensors")[k] == v).all() for k, v in first.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged-")]  # no staging folder left


@pytest.mark.parametrize("card", ["{bad", "[1, 2]"])
def test_a_damaged_run_card_is_one_line_naming_it(toy, tmp_path, capsys, card):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(toy[1], adapter)
    (adapter / "lorakit.json").write_text(card)
    assert main(["merge", "--model", str(toy[0]), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit")]
    assert len(err) == 1 and f"{adapter / 'lorakit.json'}" in err[0] and "run card" in err[0], err


def test_force_never_replaces_an_input_the_current_folder_or_the_cache(toy, tmp_path, capsys, monkeypatch):
    """--force replaces an output folder of the user's, never one holding an input, the current folder (an empty
    --output) or lorakit's cache; a parent that is a file is named; each refused before the model loads."""
    import shutil

    from lorakit.models import cache_root

    run = tmp_path / "run"
    shutil.copytree(toy[1], run / "adapter")
    (run / "notes.txt").write_text("mine")
    folder = toy[0]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cases = [(run, "is or holds"), ("", "argument --output: given ''"), (".", "is the current folder or holds it"),
             (cache_root() / "models" / "m", "lies in lorakit's cache"), (tmp_path / "afile" / "sub", "is a file")]
    for output, message in cases:
        code, err = cli(capsys, "merge", "--model", str(folder), "--adapter", str(run / "adapter"), "--output",
                        str(output), "--force")
        assert code == 2 and len(err) == 1 and message in err[0], (output, err)
    assert (run / "notes.txt").read_text() == "mine" and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_merged_folder_is_readable_as_one_made_by_hand(toy, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        assert _merge(toy, tmp_path / "merged") == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755


def test_a_merge_that_unties_the_head_says_so(tmp_path, capsys):
    folder = toy_model_folder(tmp_path / "model")
    tied = load_causal_lm(folder)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(folder)
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=["embed_tokens"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert _merge((folder, tmp_path / "adapter"), tmp_path / "merged") == 0
    assert "the merged model keeps them apart (tie_word_embeddings false)" in capsys.readouterr().err
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert not weights["lm_head.weight"].equal(weights["model.embed_tokens.weight"])  # the head is the base's


def test_a_half_precision_base_is_merged_in_fp32_and_saved_in_its_own_type(toy, tmp_path, capsys):
    import json

    import torch

    folder, adapter = toy
    half = load_causal_lm(folder).to(torch.bfloat16)
    half.config.dtype = torch.bfloat16
    half.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            (tmp_path / "bf16" / name).write_bytes((folder / name).read_bytes())
    capsys.readouterr()
    assert _merge((tmp_path / "bf16", adapter), tmp_path / "merged") == 0
    assert "the merged model is saved in bfloat16, as the base is stored" in capsys.readouterr().err
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # the same merge as on the fp32 base, rounded once to bf16
    assert _merge(toy, tmp_path / "merged32") == 0
    full = load_file(tmp_path / "merged32" / "model.safetensors")
    assert all(weights[k].float().sub(full[k]).abs().max() <= full[k].abs().max() / 64 for k in full)
