"""Each check of lorakit/config_checks.py: one line naming the key and what is allowed, all reported together."""

import pytest

from lorakit.config import ConfigError, RunConfig
from lorakit.config_checks import run_problems
from lorakit.config_loading import load_run_config

CASES = [
    (["--train.scheduler", "step"], "train.scheduler: given 'step', expected one of cosine, linear, constant"),
    (["--data.format", "csv"], "data.format: given 'csv', expected one of"),
    (["--data.pack_length", "0"], "data.pack_length: given 0, expected a positive integer"),
    (["--task", "ppo"], "task: given 'ppo', expected one of causal_lm, seq_cls, dpo, orpo"),
    (["--train.lr", "0"], "train.lr: given 0.0, expected a positive number"),
    (["--train.max_minutes", "-1"], "train.max_minutes: given -1, expected a positive number of minutes or null"),
    (["--train.epochs", "-1"], "train.epochs: given -1.0, expected a positive number of passes"),
    (["--train.max_steps", "-5"], "train.max_steps: given -5, expected 0 (use epochs)"),
    (["--train.weight_decay", "-1"], "train.weight_decay: given -1.0, expected a number >= 0"),
    (["--train.max_grad_norm", "-1"], "train.max_grad_norm: given -1.0, expected 0 (no clipping)"),
    (["--train.loraplus_lr_ratio", "-2"], "train.loraplus_lr_ratio: given -2.0, expected a positive number"),
    (["--train.max_tokens_per_forward", "-1"], "train.max_tokens_per_forward: given -1, expected 0 (off)"),
    (["--train.save_total_limit", "0"], "train.save_total_limit: given 0, expected a positive number"),
    (["--train.output_dir", "''"], "train.output_dir: given an empty path"),
    (["--train.seed", "-1"], "train.seed: given -1, expected an integer from 0 to 4294967295"),
    (["--train.ddp_timeout", "0"], "train.ddp_timeout: given 0.0, expected a positive number of seconds"),
    (["--data.train_file", "a.jsonl", "--data.test_file", "a.jsonl"],
     "data.test_file: given 'a.jsonl', the same file as data.train_file"),
    (["--data.eval_size", "2.5"], "data.eval_size: given 2.5, expected 0 (no eval split)"),
    (["--data.max_train_examples", "0"], "data.max_train_examples: given 0, expected a positive integer or null"),
    (["--lora.init_lora_weights", "loftq"], "lora.init_lora_weights: 'loftq' needs a quantised base"),
    (["--lora.init_lora_weights", "pissa", "--quantization.bits", "4"],
     "lora.init_lora_weights: 'pissa' moves part of W into the adapter"),
    (["--train.warmup_ratio", "1"], "train.warmup_ratio: given 1.0, expected a number in [0, 1)"),
    (["--train.spike_factor", "0.5"], "train.spike_factor: given 0.5, expected 0 (off) or a number above 1"),
    (["--train.max_rollbacks", "-1"], "train.max_rollbacks: given -1, expected an integer >= 0"),
    (["--train.report_to", "neptune"], "train.report_to: given 'neptune', expected jsonl, none"),
    (["--preference.beta", "0"], "preference.beta: given 0.0, expected a positive number"),
    (["--task", "dpo", "--data.packing", "true"], "data.packing: task dpo compares a chosen and a rejected sequence"),
    (["--task", "orpo", "--data.packing", "false", "--train.max_tokens_per_forward", "0",
      "--train.precompute_reference", "true"], "train.precompute_reference: orpo needs no reference model"),
    (["--train.precompute_reference", "true"], "train.precompute_reference: task causal_lm has no reference model"),
    (["--task", "orpo", "--data.packing", "false", "--train.max_tokens_per_forward", "0", "--preference.loss_type",
      "ipo"], "preference.loss_type: given 'ipo', which task orpo does not use; it applies to task dpo"),
    (["--task", "orpo", "--data.packing", "false", "--train.max_tokens_per_forward", "0", "--preference.rpo_alpha",
      "5"], "preference.rpo_alpha: given 5, which task orpo does not use; it applies to task dpo"),
    (["--task", "dpo", "--data.packing", "false", "--train.max_tokens_per_forward", "0",
      "--preference.orpo_prompt_loss", "false"],
     "preference.orpo_prompt_loss: given False, which task dpo does not use; it applies to task orpo"),
    (["--preference.beta", "0.5"], "preference.beta: given 0.5, which task causal_lm does not use; it applies to "
                                   "task dpo and orpo"),
    (["--data.hf_dataset", "x", "--data.train_file", "a.jsonl"],
     "data.hf_dataset: given 'x' with data.train_file 'a.jsonl'; expected one source of training records"),
    (["--data.eval_file", "b.jsonl", "--data.eval_size", "0.5"], "data.eval_size: given 0.5 with data.eval_file"),
    (["--data.packing", "true", "--data.pack_length", "4"],
     "data.pack_length: given 4, shorter than data.max_length 256"),
    (["--data.template", "'Q: {question}'"],
     "data.template: given 'Q: {question}'; template 'custom' has unknown placeholder {question}"),
    (["--data.template", "'Q: {instruction} A: {output}'"], "template 'custom' uses {output}"),
    (["--data.template", "vicuna"], "data.template: given 'vicuna'; unknown template 'vicuna'; expected one of seed"),
    # a data setting the task does not read is refused, not ignored
    (["--task", "seq_cls", "--data.packing", "true"],
     "data.packing: given True, which task seq_cls does not use; it applies to the text-generating tasks"),
    (["--task", "seq_cls", "--data.template", "alpaca"], "data.template: given 'alpaca', which task seq_cls does not"),
    (["--task", "seq_cls", "--data.hf_dataset", "x"], "data.hf_dataset: given 'x', which task seq_cls does not use"),
    (["--task", "seq_cls", "--data.format", "instruction"],
     "data.format: given 'instruction'; task seq_cls reads text/label records"),
    (["--data.text_column", "sentence"],
     "data.text_column: given 'sentence', which task causal_lm does not use; it applies to task seq_cls"),
    (["--task", "dpo", "--data.packing", "false", "--train.max_tokens_per_forward", "0", "--data.label_names",
      "[a, b]"], "data.label_names: given ['a', 'b'], which task dpo does not use"),
]


@pytest.mark.parametrize(("overrides", "line"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_each_check_names_its_key(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert any(line in problem for problem in err.value.problems), err.value.problems


def test_the_defaults_have_no_problems():
    assert run_problems(RunConfig()) == []


def test_problems_of_several_sections_come_together():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["--train.lr", "0", "--data.max_length", "0", "--train.warmup_ratio", "2"])
    keys = [problem.split(":")[0].removeprefix("--") for problem in err.value.problems]
    assert sorted(keys) == ["data.max_length", "train.lr", "train.warmup_ratio"]
