"""Property tests of the YAML run config and its `--section.key value` overrides (Hypothesis).

Property: a file either loads into a RunConfig that saves and loads back equal (as the resolved
config saved beside every run does), or is refused with one ConfigError line whose every problem
names FILE:LINE (or the override) - never another exception, never a hang.

The "ci" profile (tests/conftest.py) runs a few fixed examples per property;
`pytest tests/test_config_properties.py --hypothesis-profile thorough` runs many fresh ones.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from lorakit.config import ConfigError, RunConfig, to_dict
from lorakit.config_loading import _coerce, _matches, load_run_config
from property_support import ODD_CHARS, examples, time_limit

HINTS = typing.get_type_hints(RunConfig)
SECTIONS = {name: hint for name, hint in HINTS.items() if dataclasses.is_dataclass(hint)}
FIELDS = [(section, name, hint) for section, cls in SECTIONS.items()
          for name, hint in typing.get_type_hints(cls).items()]
TOP_FIELDS = [(None, name, hint) for name, hint in HINTS.items() if name not in SECTIONS]
BASE = {"data": {"train_file": "train.jsonl"}}  # the smallest valid config

TEXT = st.text(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)), max_size=30)  # lone surrogates too
YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
                         st.floats(allow_nan=True, allow_infinity=True), TEXT)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(TEXT, st.integers()), inner, max_size=3)), max_leaves=6)


def value_of(hint) -> st.SearchStrategy:
    """Values of the field's own type (which its checks may still refuse)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and origin is not list and origin is not dict:  # a union
        return st.one_of(*(value_of(a) for a in args))
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-3, 10**6)
    if hint is float:
        return st.one_of(st.floats(-10, 1e4, allow_nan=False), st.sampled_from([0.0, 0.1, 0.5, 1.0, 2e-4]))
    if hint is str:
        return TEXT
    if origin is list:
        return st.lists(value_of(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(TEXT, value_of(args[1]), max_size=3)
    raise AssertionError(f"no strategy for {hint}")


def yaml_value(value) -> str:
    """`value` as one line of YAML (double-quoted scalars: every character escaped that needs it)."""
    return yaml.safe_dump(value, default_style='"', default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


def config_text(edits: dict[tuple[str | None, str], object], line_end: str = "\n") -> tuple[str, dict]:
    """A config file with BASE and `edits`, one key a line; returns it and each edited key's line."""
    sections: dict[str | None, dict[str, object]] = {}
    for (section, name), value in {**{("data", "train_file"): "train.jsonl"}, **edits}.items():
        sections.setdefault(section, {})[name] = value
    lines, where = [], {}
    for name, value in sections.pop(None, {}).items():
        lines.append(f"{name}: {yaml_value(value)}")
        where[(None, name)] = len(lines)
    for section, values in sections.items():
        lines.append(f"{section}:")
        for name, value in values.items():
            lines.append(f"  {name}: {yaml_value(value)}")
            where[(section, name)] = len(lines)
    return line_end.join(lines) + line_end, where


def assert_refusal(err: ConfigError, path: Path | None) -> None:
    """One line; each problem names FILE:LINE, the file, or the override that caused it."""
    assert "\n" not in str(err) and "\r" not in str(err), str(err)
    for problem in err.problems:
        assert problem.startswith("--") or (path is not None and problem.startswith(f"{path}")), problem


def outcome(path: Path, overrides: list[str] | None = None) -> RunConfig | list[str]:
    """The loaded config, saved and loaded back equal (as a run saves it); or a refusal's problems."""
    with time_limit(20):
        try:
            config = load_run_config(path, overrides)
        except ConfigError as err:
            assert_refusal(err, path)
            return err.problems
    saved = path.with_name("saved.yaml")
    saved.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    assert load_run_config(saved) == config
    return config


EDITS = st.lists(st.sampled_from(FIELDS + TOP_FIELDS), max_size=6, unique=True).flatmap(
    lambda chosen: st.fixed_dictionaries({(s, n): value_of(h) for s, n, h in chosen}))


@given(edits=EDITS, line_end=st.sampled_from(["\n", "\r\n", "\r"]), bom=st.booleans())
def test_a_config_loads_and_saves_back_equal_or_is_refused_in_one_line(tmp_path, edits, line_end, bom):
    """Values of each field's own type, in any file layout: the file and the same values as
    overrides give the same config (or the same refusal)."""
    text, _ = config_text(edits, line_end)
    path = tmp_path / "run.yaml"
    path.write_bytes((("\ufeff" if bom else "") + text).encode("utf-8", "surrogatepass"))
    from_file = outcome(path)
    overrides = [item for (s, n), v in edits.items() for item in (f"--{s + '.' if s else ''}{n}", yaml_value(v))]
    (tmp_path / "base.yaml").write_text("data:\n  train_file: train.jsonl\n")
    from_overrides = outcome(tmp_path / "base.yaml", overrides)
    assert isinstance(from_file, list) == isinstance(from_overrides, list), (from_file, from_overrides)
    if not isinstance(from_file, list):
        assert from_file == from_overrides


@pytest.mark.parametrize("where", ["file", "override"])
@given(data=st.data())
def test_a_wrong_value_in_any_field_is_refused_naming_its_line(tmp_path, where, data):
    section, name, hint = data.draw(st.sampled_from(FIELDS + TOP_FIELDS))
    value = data.draw(YAML_VALUES)
    key = f"{section}.{name}" if section else name
    path = tmp_path / "run.yaml"
    if where == "file":
        text, lines = config_text({(section, name): value})
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        got, named = outcome(path), f"{path}:{lines[(section, name)]}: {key}: "
    else:
        path.write_text("data:\n  train_file: train.jsonl\n")
        got, named = outcome(path, [f"--{key}", yaml_value(value)]), f"--{key}: "
    if not _matches(_coerce(value, hint), hint):  # YAML 1.1 reads a bare `no` as false: taken back as "no"
        assert isinstance(got, list) and any(p.startswith(named) for p in got), (named, got)


RANDOM_TEXT = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(["train:", "  lr: 1", "data:", "- x", "  - y", "a: [", "]", "&a x", "*a", "<<: *a",
                              "!!python/object:os.system", "? k", ": v", "\t", "'", '"', "{", "}", "...", "---",
                              "%YAML 1.1", "\ufeff", "\x00", "\x85"]), max_size=12)
    .map(lambda parts: "\n".join(parts).encode("utf-8", "surrogatepass")),
)


@given(raw=RANDOM_TEXT)
@example(raw=b"a: &x [*x]\n")  # an alias to its own anchor: a cycle
@example(raw=b"lora:\n  rank_pattern: {1: 2}\n")
@example(raw=b"data:\n  train_file: \"\\0\"\n")
@example(raw=b"model: \"\\uD800\"\n")
def test_random_bytes_load_or_are_refused_in_one_line(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    result = outcome(path)  # a refusal is checked inside: one problem per line, naming the file
    assert isinstance(result, RunConfig) or (result and all(isinstance(p, str) for p in result))


@examples(0.3)  # each example loads the file once per byte
@given(edits=EDITS)
def test_a_config_cut_at_any_byte_loads_or_is_refused_in_one_line(tmp_path, edits):
    raw = config_text(edits)[0].encode("utf-8", "surrogatepass")
    path = tmp_path / "run.yaml"
    for end in range(len(raw)):
        path.write_bytes(raw[:end])
        result = outcome(path)
        assert isinstance(result, RunConfig) or (result and all(isinstance(p, str) for p in result))


@examples(1)
@given(edits=EDITS.filter(bool), data=st.data())
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, edits, data):
    text, lines = config_text(edits)
    (section, name) = data.draw(st.sampled_from(sorted(lines, key=str)))
    rows = text.split("\n")
    line = lines[(section, name)]
    rows.insert(line, rows[line - 1])  # the same key again on the next line
    path = tmp_path / "run.yaml"
    path.write_bytes("\n".join(rows).encode("utf-8", "surrogatepass"))
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value) == (f"{path}:{line + 1}: the key '{name}' is given twice in one mapping (first on line "
                              f"{line}); expected each key once")


@pytest.mark.parametrize("depth", [10, 100, 2_000])
@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_refused_in_one_line(tmp_path, depth, where):
    nested = "[" * depth + "]" * depth
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  train_file: t.jsonl\nlora:\n  target_modules: {nested}\n" if where == "file" else "")
    with time_limit(60), pytest.raises(ConfigError) as err:
        load_run_config(path, None if where == "file" else ["--lora.target_modules", nested])
    assert_refusal(err.value, path)


@pytest.mark.parametrize("field", ["model", "train.output_dir", "data.template"])
def test_a_huge_value_loads_or_is_refused_in_one_line(tmp_path, field):
    section, _, name = field.rpartition(".")
    text, _ = config_text({(section or None, name): "x" * 200_000})
    path = tmp_path / "run.yaml"
    path.write_text(text)
    config = outcome(path)
    assert isinstance(config, list) or len(str(getattr(getattr(config, section) if section else config, name))) == 200_000
