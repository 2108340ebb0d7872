"""Reading run configs: YAML, dotted overrides, types, and every problem named at once."""

import pytest

from lorakit.config import ConfigError
from lorakit.config_loading import load_run_config, parse_overrides


def test_overrides_are_read_as_yaml_values():
    assert parse_overrides(["--train.lr", "0.01", "--lora.r=4", "--lora.target-modules", "[q_proj, v_proj]"]) == [
        ("train.lr", 0.01), ("lora.r", 4), ("lora.target_modules", ["q_proj", "v_proj"])]


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  r: 16\ntrain:\n  lr: 1.0e-3\n  epochs: 2\n")
    config = load_run_config(path, ["--lora.r", "4", "--train.weight_decay", "1e-2"])
    assert (config.lora.r, config.train.lr, config.train.epochs, config.train.weight_decay) == (4, 1e-3, 2.0, 0.01)


def test_a_bare_no_is_the_strategy_not_false(tmp_path):
    # YAML 1.1 reads `no` as false; for a string field it means the choice "no".
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  eval_strategy: no\n")
    config = load_run_config(path, ["--train.save_strategy", "no"])
    assert (config.train.eval_strategy, config.train.save_strategy) == ("no", "no")
    # A bool field still takes a bool.
    assert load_run_config(None, ["--train.fused", "no"]).train.fused is False


def test_every_problem_is_named_together(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  lora_alpah: 4\ntrain:\n  lr: fast\n  epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "lora.lora_alpah: unknown key (did you mean 'lora_alpha'?)" in message
    assert "train.lr: given 'fast', expected float" in message
    assert "train.epochs: given 'many', expected float" in message


def test_range_problems_name_the_field():
    with pytest.raises(ConfigError, match=r"train.batch_size: given 0, expected a positive integer"):
        load_run_config(None, ["--train.batch_size", "0"])
    with pytest.raises(ConfigError, match=r"train.save_strategy: given 'yes', expected one of no, steps, epoch"):
        load_run_config(None, ["--train.save_strategy", "yes"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
