"""`lorakit merge`: the merged model in a new folder, written whole; never over the base, a non-empty folder only with
--force; a damaged run card is one line."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.models import load_causal_lm
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
    assert "is the base model's or the adapter's folder" in capsys.readouterr().err
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
