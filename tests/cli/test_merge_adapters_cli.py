"""`lorakit merge-adapters`: a normal PEFT adapter out, one line and exit 2 for bad input, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

import lorakit
from conftest import TOY_TARGETS, logits_of, perturb, toy_model_folder
from lorakit.cli import main
from lorakit.models import load_causal_lm


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A toy base folder and two adapters on it (ranks 4, 4 and 2), saved by lorakit."""
    root = tmp_path_factory.mktemp("merge-adapters")
    folder = toy_model_folder(root / "model")
    for seed, (name, r) in enumerate([("a", 4), ("b", 4), ("c", 2)]):
        model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=r, lora_alpha=8, target_modules=TOY_TARGETS))
        perturb(model, std=0.05, seed=seed)
        lorakit.save_adapter(model, root / name)
    # q, v: rank 4 on q_proj / v_proj only; layer0: rank 4 on the first layer's q_proj, chosen by a regex
    for name, targets in (("q", ["q_proj"]), ("v", ["v_proj"]), ("layer0", r".*layers\.0\.self_attn\.q_proj")):
        model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        perturb(model, std=0.05, seed=len(name))
        lorakit.save_adapter(model, root / name)
    # d: rank 4 but 2 on down_proj (its largest rank equals a's); other-base and biased: a's files, configs edited
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS,
                                                                      rank_pattern={"down_proj": 2}))
    perturb(model, std=0.05, seed=5)
    lorakit.save_adapter(model, root / "d")
    for name, change in (("other-base", {"base_model_name_or_path": "elsewhere"}), ("biased", {"bias": "all"})):
        shutil.copytree(root / "a", root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return root


def cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_ties_merge_writes_an_adapter_peft_loads(adapters, tmp_path, capsys):
    out = tmp_path / "ab"
    code, _ = cli(capsys, "merge-adapters", adapters / "a", adapters / "b", "--weights", "0.5", "0.5",
                  "--method", "ties", "--density", "0.5", "--output", out)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "lorakit.json"]
    assert json.loads((out / "lorakit.json").read_text())["combination_type"] == "ties"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    model = load_causal_lm(adapters / "model")
    lorakit.load_adapter(model, adapters / "a", "a")
    lorakit.load_adapter(model, adapters / "b", "b")
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "m", "ties", density=0.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = logits_of(model, ids)
    with lorakit.disable_adapters(model):
        assert (expected - logits_of(model, ids)).abs().max() > 1e-3  # the merge changes the model
    peft_model = PeftModel.from_pretrained(load_causal_lm(adapters / "model"), out).eval()
    assert (logits_of(peft_model, ids) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a", "b", "--weights", "0.5"], "--weights: 1 given for 2 adapters"),
        (["a", "c", "--weights", "1", "1", "--method", "ties", "--density", "0.5"],
         "--method 'ties' combines A's and B's entry by entry, so the adapters need one rank"),
        (["a", "b", "--weights", "1", "1", "--method", "dare_ties"], "--density: not given; 'dare_ties' needs"),
        (["a", "b", "--weights", "1", "1", "--method", "ties", "--density", "1.5"], "--density: given 1.5"),
        (["a", "nope", "--weights", "1", "1"], "nope/adapter_config.json: not found"),
        (["a", "b", "--weights", "nan", "0.5"], "--weights: given nan, expected a finite number"),
        (["a", "b", "--weights", "1", "1", "--method", "svd", "--svd-clamp", "5"],
         "--svd-clamp: given 5.0, expected a quantile"),
        # an option the method does not read is named, not ignored
        (["a", "b", "--weights", "1", "1", "--method", "linear", "--density", "0.1"],
         "--density: given 0.1, which 'linear' does not use"),
        (["a", "b", "--weights", "1", "1", "--svd-rank", "2"], "--svd-rank: given 2, which 'cat' does not use"),
        (["a", "b", "--weights", "1", "1", "--method", "linear", "--majority-sign", "frequency"],
         "--majority-sign: given 'frequency', which 'linear' does not use"),
        (["a", "b", "--weights", "1", "1", "--method", "ties", "--density", "0.5", "--seed", "9"],
         "--seed: given 9, which 'ties' does not use"),
        (["a", "d", "--weights", "1", "1", "--method", "ties", "--density", "0.5"], "the adapters need one rank"),
        (["a", "other-base", "--weights", "1", "1"], "made for elsewhere, the first adapter for"),
        (["biased", "b", "--weights", "1", "1"], "bias is 'all'; a combination merges LoRA factors only"),
    ],
    ids=["weights", "ranks", "no-density", "density-range", "missing-folder", "nan-weight", "svd-clamp",
         "unused-density", "unused-svd-rank", "unused-sign", "unused-seed", "rank-pattern", "other-base", "bias"],
)
def test_bad_input_is_one_line_and_writes_nothing(adapters, tmp_path, capsys, argv, message):
    argv = [adapters / a if a in ("a", "b", "c", "d", "nope", "other-base", "biased") else a for a in argv]
    code, lines = cli(capsys, "merge-adapters", *argv, "--output", tmp_path / "out")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("lorakit merge-adapters: error:") and message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten(adapters, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, lines = cli(capsys, "merge-adapters", adapters / "a", adapters / "b", "--weights", "1", "1",
                      "--output", tmp_path / "out")
    assert code == 2
    assert lines[0].endswith(f"--output {tmp_path / 'out'}: already holds files; name a new or empty folder")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_unknown_method_is_refused_by_the_parser(adapters, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge-adapters", str(adapters / "a"), "--weights", "1", "--method", "mean", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, rank",
    [
        (["q", "v", "--weights", "1", "0.5"], 4),  # disjoint targets: each module holds rank 4, not 4 + 4
        (["layer0", "layer0", "--weights", "0.5", "0.5"], 8),  # a regex subset: layer 1's q_proj has no weights
        (["q", "layer0", "--weights", "1", "1", "--method", "svd", "--svd-rank", "1000"], 64),  # above the layers'
    ],
    ids=["disjoint-cat", "regex-subset", "svd-rank-above-the-layers"],
)
def test_every_written_adapter_loads_in_lorakit_as_in_peft(adapters, tmp_path, capsys, argv, rank):
    argv = [adapters / a if a in ("q", "v", "layer0") else a for a in argv]
    code, _ = cli(capsys, "merge-adapters", *argv, "--output", tmp_path / "out")
    assert code == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == rank  # the rank it holds
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_causal_lm(adapters / "model")
    lorakit.load_adapter(model, tmp_path / "out")
    peft_model = PeftModel.from_pretrained(load_causal_lm(adapters / "model"), tmp_path / "out").eval()
    with lorakit.disable_adapters(model):
        base = logits_of(model, ids)
    assert (logits_of(model.eval(), ids) - base).abs().max() > 1e-3
    assert (logits_of(model, ids) - logits_of(peft_model, ids)).abs().max().item() <= 1e-5
