"""`lorakit generate` batch mode equals one-at-a-time generation; `inspect` and `merge` run."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import lorakit
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.lora.int8_factors import int8_rows
from lorakit.models import load_causal_lm, load_tokenizer
from conftest import TOY_TARGETS, perturb, toy_model_folder

WORDS = ["red", "green", "blue", "black", "white", "pink", "gold", "grey", "tan", "navy"]


def test_batched_generation_equals_one_at_a_time(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    perturb(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "adapter")
    instructions = [f"say {' '.join(WORDS[: 1 + i % 7])} {i}" for i in range(50)]  # lengths differ: left padding
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": t, "id": i}) + "\n" for i, t in enumerate(instructions)))

    subprocess.run(
        [sys.executable, "-m", "lorakit", "generate", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
         "--template", "seed", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
         "--max-new-tokens", "12", "--batch-size", "64"],
        check=True,
    )
    batched = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in batched] == list(range(50))  # fields are kept, order too

    tokenizer = load_tokenizer(folder)
    reference = load_causal_lm(folder)
    lorakit.load_adapter(reference, tmp_path / "adapter")
    prompts = [f"### Instruction:\n{t}\n\n### Command:\n" for t in instructions]
    alone = generate(reference, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=1))
    assert [r["output"] for r in batched] == alone
    assert len(set(alone)) > 5  # not a degenerate constant output


def test_generation_on_int8_weights_is_what_the_library_gives_and_follows_the_adapter(tmp_path):
    from lorakit.infer.int8_weights import use_int8_weights

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    perturb(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "adapter")
    instructions = [f"say {WORDS[i]} {i}" for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in instructions))

    def cli(*extra):
        subprocess.run(
            [sys.executable, "-m", "lorakit", "generate", "--model", str(folder), "--template", "seed", "--input",
             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--force", "--max-new-tokens", "8",
             *extra],
            check=True,
        )
        return [json.loads(line)["output"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    quantised = cli("--adapter", str(tmp_path / "adapter"), "--quantize", "int8")
    reference = load_causal_lm(folder)
    use_int8_weights(reference, "int8")
    lorakit.load_adapter(reference, tmp_path / "adapter")
    prompts = [f"### Instruction:\n{t}\n\n### Command:\n" for t in instructions]
    assert quantised == generate(reference, load_tokenizer(folder), prompts, GenerationConfig(max_new_tokens=8))
    assert quantised != cli("--quantize", "int8")  # the adapter took part


def test_generation_on_bf16_factors_is_the_rounded_adapters(tmp_path):
    from lorakit.lora.adapters import round_adapter

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    perturb(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "adapter")
    round_adapter(model, "default", torch.bfloat16)
    lorakit.save_adapter(model, tmp_path / "rounded")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": f"say {w}"}) + "\n" for w in WORDS))

    def cli(adapter, *extra):
        subprocess.run(
            [sys.executable, "-m", "lorakit", "generate", "--model", str(folder), "--template", "seed", "--input",
             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--force", "--max-new-tokens", "8",
             "--adapter", str(tmp_path / adapter), *extra],
            check=True,
        )
        return [json.loads(line)["output"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    assert cli("adapter", "--lora-dtype", "bf16") == cli("rounded")
    assert cli("rounded", "--lora-dtype", "bf16") == cli("rounded")  # bf16 values stay as they are
    from lorakit.infer.load import load_for_inference

    loaded = {lora: dict(load_for_inference(str(folder), str(tmp_path / "adapter"), "seed", lora_dtype=lora)[0]
                         .named_parameters()) for lora in ("fp32", "bf16", "int8")}
    rounded = dict(model.named_parameters())
    factors = [name for name in rounded if ".adapters.default." in name]
    assert factors and all(torch.equal(loaded["bf16"][n], rounded[n]) for n in factors)
    assert not all(torch.equal(loaded["fp32"][n], rounded[n]) for n in factors)  # the flag is what rounded them
    ranks = [loaded["int8"][n] if n.endswith(".A") else loaded["int8"][n].t() for n in factors]  # each rank of each
    assert all(int8_rows(r, torch.ones(len(r))) is not None for r in ranks)
    assert not any(int8_rows(loaded["fp32"][n], torch.ones(len(loaded["fp32"][n]))) is not None for n in factors)


def test_inspect_and_merge(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    shown = subprocess.run([sys.executable, "-m", "lorakit", "inspect", str(tmp_path / "adapter")],
                           capture_output=True, text=True, check=True).stdout
    assert "LoRA modules: 4   ranks: [4]" in shown and "trained (non-zero update): yes" in shown

    subprocess.run([sys.executable, "-m", "lorakit", "merge", "--model", str(folder), "--adapter",
                    str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")], check=True)
    with torch.no_grad():
        merged = load_causal_lm(tmp_path / "merged")(input_ids=ids).logits
    assert (merged - expected).abs().max() <= 1e-5


def test_device_map_auto_gives_the_same_output(tmp_path, capsys):
    """`--device-map auto` loads through accelerate's placement (here all on the CPU; several GPUs unchecked)."""
    from lorakit.cli import main

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    perturb(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "adapter")
    args = ["generate", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--template", "seed",
            "--prompt", "say red green", "--max-new-tokens", "12"]
    outputs = []
    for extra in ([], ["--device-map", "auto"]):
        assert main([*args, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_batch_outputs_never_replace_an_input_and_need_force_over_a_file(tmp_path, capsys):
    """generate --output: the --input file is refused even with --force, an existing file needs --force, a missing
    folder is named; each before the model loads. mine-preferences: its --data, even with --force."""
    from cli_support import cli

    folder = toy_model_folder(tmp_path / "model")
    records = tmp_path / "in.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in WORDS[:3]))
    before = records.read_bytes()
    common = ["generate", "--model", str(folder), "--template", "seed", "--max-new-tokens", "2",
              "--input", str(records)]
    for output, extra, message in [(records, ["--force"], "which this command reads"),
                                   (tmp_path / "none" / "out.jsonl", [], "does not exist; create it first"),
                                   ("", [], "argument --output: given ''")]:
        code, lines = cli(capsys, *common, "--output", str(output), *extra)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    code, lines = cli(capsys, *common, "--output", str(out))
    assert code == 2 and "already exists; pass --force to replace it" in lines[0] and out.read_text() == "mine\n"
    assert cli(capsys, *common, "--output", str(out), "--force")[0] == 0
    assert len(out.read_text().splitlines()) == 3
    code, lines = cli(capsys, "mine-preferences", "--model", str(folder), "--template", "seed", "--data", str(records),
                      "--output", str(records), "--force", "--samples", "2")
    assert code == 2 and "which this command reads" in lines[0], lines
    assert records.read_bytes() == before


def test_an_empty_instruction_is_named_by_its_line(tmp_path, capsys):
    """A record whose instruction is blank would generate from the template's bare scaffolding: refused, by line."""
    from cli_support import cli

    folder = toy_model_folder(tmp_path / "model")
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"instruction": "say a"}) + "\n" + json.dumps({"instruction": " \n"}) + "\n")
    code, lines = cli(capsys, "generate", "--model", str(folder), "--template", "seed", "--max-new-tokens", "2",
                      "--input", str(records), "--output", str(tmp_path / "out.jsonl"))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"{records}:2: field 'instruction' is empty (expected the instruction's text)"), lines
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_without_a_chat_template_and_output_without_input_are_one_line(tmp_path, capsys):
    from cli_support import cli

    folder = toy_model_folder(tmp_path / "model")  # its tokenizer has no chat template
    for argv, message in [(["--chat", "--prompt", "hi"], "--prompt: a conversation is rendered with the tokenizer's "
                                                         "chat template, and this tokenizer has none"),
                          (["--prompt", "hi", "--output", str(tmp_path / "o.jsonl")], "--output goes with --input")]:
        code, lines = cli(capsys, "generate", "--model", str(folder), "--max-new-tokens", "2", *argv)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o.jsonl").exists()


def test_inspect_shows_a_dora_adapter(tmp_path, capsys):
    from lorakit.cli import main

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    shown = capsys.readouterr().out
    assert "dora: True" in shown and "LoRA modules: 2   ranks: [4]" in shown


def test_inspect_says_when_r_and_alpha_are_defaults_the_config_does_not_give(tmp_path, capsys):
    from lorakit.cli import main

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "r: 4   alpha: 8   rslora" in capsys.readouterr().out
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "r"}))
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "r: 8 (unset: the default)   alpha: 8   rslora" in capsys.readouterr().out


def test_transformers_progress_bars_show_only_with_verbose(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    (tmp_path / "in.jsonl").write_text(json.dumps({"instruction": "say red 1"}) + "\n")

    def stderr(*flags):
        return subprocess.run(
            [sys.executable, "-m", "lorakit", *flags, "generate", "--model", str(folder), "--template", "seed",
             "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--force",
             "--max-new-tokens", "2"],
            check=True, capture_output=True, text=True,
        ).stderr

    assert "Loading weights" not in stderr()  # lorakit's own lines say what happened
    assert "Loading weights" in stderr("-v")


def test_hiding_transformers_bars_leaves_the_hubs_download_bars_on():
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from lorakit.cli import main

    try:
        assert main(["inspect", "/nonexistent-adapter"]) == 2
        assert not transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    finally:  # as the rest of the test session had it
        transformers_logging.enable_progress_bar()
        enable_progress_bars()
