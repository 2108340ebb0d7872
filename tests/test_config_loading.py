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


def test_each_problem_names_the_line_of_its_key_or_its_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlora:\n  r: 0\ntrain:\n  epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, ["--train.lr", "-1"])
    assert sorted(err.value.problems) == [
        "--train.lr: given -1.0, expected a positive number",
        f"{path}:3: lora.r: given 0, expected a positive integer",
        f"{path}:5: train.epochs: given 'many', expected float",
    ]
    with pytest.raises(ConfigError, match=r"^--train.lr: given -1.0, expected a positive number$"):
        load_run_config(path, ["--train.lr", "-1", "--lora.r", "2", "--train.epochs", "1"])


def test_a_problem_in_a_section_an_override_made_or_set_whole_names_that_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n")
    with pytest.raises(ConfigError, match=r"^--nosuch\.key: nosuch: unknown key; known: data, "):
        load_run_config(path, ["--nosuch.key", "1"])
    with pytest.raises(ConfigError, match=r"^--preference: preference\.gamma: unknown key; known: beta, "):
        load_run_config(path, ["--preference", "{beta: 0.3, gamma: 1}"])


def test_a_boolean_becomes_a_word_only_where_that_word_is_a_choice(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  save_strategy: false\n  half_base: false\n")
    config = load_run_config(path)
    assert (config.train.save_strategy, config.train.half_base) == ("no", "off")
    path.write_text("train:\n  output_dir: false\n  metric_for_best: true\n")
    with pytest.raises(ConfigError) as err:  # not a folder named 'no', or a metric named 'yes'
        load_run_config(path)
    assert sorted(err.value.problems) == [f"{path}:2: train.output_dir: given False, expected str",
                                          f"{path}:3: train.metric_for_best: given True, expected str"]
    with pytest.raises(ConfigError, match=r"^--lora\.target_modules: given False, expected a list"):
        load_run_config(None, ["--lora.target_modules", "false"])


def test_an_override_of_a_text_setting_is_the_text_typed(tmp_path):
    config = load_run_config(None, ["--data.template", "Q: {instruction}\nA: ", "--train.output_dir", "2024",
                                    "--eval.task", "ros2"])
    assert (config.data.template, config.train.output_dir) == ("Q: {instruction}\nA: ", "2024")
    for typed in ["{instruction}", "[INST] {instruction} [/INST]", "{instruction} -> ", "Q: {instruction}: A:",
                  "'{instruction}' means", "Answer {instruction} "]:  # not YAML, or YAML that drops a space
        assert load_run_config(None, ["--data.template", typed]).data.template == typed
    assert load_run_config(None, ["--data.template", "'Q: {instruction} '"]).data.template == "Q: {instruction} "
    with pytest.raises(ConfigError, match=r"^--train\.output_dir: given True, expected str$"):
        load_run_config(None, ["--train.output_dir", "true"])  # booleans and null keep their YAML meaning
    assert load_run_config(None, ["--lora.target_modules", "[q_proj, v_proj]"]).lora.target_modules == [
        "q_proj", "v_proj"]  # a setting that takes a list still reads one


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", ":3: the key 'lr' is given twice in one mapping (first on line 2)"),
        ("train:\n  lr: .nan\n", ":2: train.lr: given nan, expected a finite number"),
        ("train:\n  epochs: .inf\n", ":2: train.epochs: given inf, expected a finite number"),
        ("lora:\n  rank_pattern: [1, 2]\n", ":2: lora.rank_pattern: given [1, 2], expected a mapping"),
        ("lora:\n  rank_pattern: {q_proj: x}\n",
         ":2: lora.rank_pattern: given {'q_proj': 'x'}, expected a mapping of str to int"),
        ("train:\n  lr: 1\x00\n", ":2: not valid YAML (character #x0000 is not allowed)"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", ": YAML nested too deeply to read"),
        ("- a\n- b\n", ":1: expected a mapping of sections (model, lora, data, train, eval), given list"),
        (b"train:\n  lr: \xed\xa0\x80\n", ":2: byte 0xed is not valid UTF-8; expected a UTF-8 text file"),
        ("train:\n  lr: !!float\n", ":2: not valid YAML (!!float '' cannot be read as float)"),  # was an IndexError
        ("lora:\n  r: 2\n  use_rslora: !!bool maybe\n", ":3: not valid YAML (!!bool 'maybe' cannot be read as bool)"),
        ('data:\n  test_file: "\\uD800"\n',  # was a UnicodeEncodeError in os.path.realpath
         ":2: data.test_file: given '\\ud800', expected text without NUL characters or lone surrogates"),
        ('data:\n  train_file: "t\\0"\n',
         ":2: data.train_file: given 't\\x00', expected text without NUL characters or lone surrogates"),
    ],
)
def test_malformed_yaml_is_one_problem_naming_the_line(tmp_path, text, message):
    """Cases the property tests (tests/test_config_properties.py) generate, kept as examples."""
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value).startswith(f"{path}{message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["[unclosed", "!!python/object:os.system x", "{a: 1, a: 2", "!!float", "!!int x"])
def test_an_override_that_is_not_yaml_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^--train.lr: .* is not a valid YAML value \("):
        load_run_config(None, ["--train.lr", value])


def test_line_ends_and_a_byte_order_mark_read_the_same(tmp_path):
    text = "train:\n  lr: 0.1\n  epochs: 2\n"
    for name, variant in [("lf", text), ("crlf", text.replace("\n", "\r\n")), ("cr", text.replace("\n", "\r")),
                          ("bom", "\ufeff" + text)]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(variant, newline="")
        config = load_run_config(path)
        assert (config.train.lr, config.train.epochs) == (0.1, 2.0), name


def test_yes_no_on_off_are_words_for_word_settings_and_booleans_for_boolean_ones(tmp_path):
    """YAML 1.1 read `half_base: off` as False, which came back as 'no' and was refused (the README's own advice);
    only true/false are booleans now, and a boolean setting still takes yes/no/on/off."""
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain:\n  half_base: off\n  save_strategy: no\n  progress: off\ndata:\n  packing: yes\n")
    config = load_run_config(path, [])
    assert (config.train.half_base, config.train.save_strategy, config.train.progress, config.data.packing) == (
        "off", "no", False, True)
    config = load_run_config(path, ["--train.half_base", "off", "--train.fused", "on", "--data.packing", "false"])
    assert (config.train.half_base, config.train.fused, config.data.packing) == ("off", True, False)


def test_numbers_and_words_on_the_command_line_are_read_as_written(tmp_path):
    """YAML 1.1 read 0042 as octal 34 and 1:30 as 90.0, and on the command line '#' began a comment: the seed
    template's own '### ...' style came out empty, and 'runs/out #2' wrote to runs/out."""
    template = "### Question: {instruction} ### Answer:"
    config = load_run_config(None, ["--train.seed", "0042", "--data.max_length", "010", "--data.template", template,
                                    "--train.output_dir", "runs/out #2", "--train.lr", "1e-3"])
    assert (config.train.seed, config.data.max_length, config.data.template) == (42, 10, template)
    assert (config.train.output_dir, config.train.lr) == ("runs/out #2", 0.001)
    with pytest.raises(ConfigError, match="train.epochs"):
        load_run_config(None, ["--train.epochs", "1:30"])
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seed: 0042\n  lr: 2.0e-4\n  output_dir: 'runs/x #1'  # a comment\n")
    config = load_run_config(path, ["--lora.target_modules", "[q_proj, v_proj]", "--eval.task", "null"])
    assert (config.train.seed, config.train.lr, config.train.output_dir) == (42, 2e-4, "runs/x #1")
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.eval.task is None
