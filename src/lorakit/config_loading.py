"""Reading a run config: YAML, then dotted CLI overrides, then typed dataclasses; every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from lorakit.config import ConfigError, RunConfig
from lorakit.config_yaml import TAG_ERRORS, ConfigLoader, KeyLines, read_yaml_mapping, yaml_problem


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--section.key value` overrides, and validate it.

    Raises:
        ConfigError: one message listing every unknown key, wrong type or value out of range, each
            preceded by the FILE:LINE of its key (or by the override that set it).
    """
    raw: dict = {}
    lines: KeyLines = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw, lines = read_yaml_mapping(path)
    overridden: dict[str, str] = {}  # key -> the text given on the command line
    for key, value, text in _overrides(overrides or []):
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: '{part}' is not a section")
        node[leaf] = value
        overridden[key] = text
    problems: list[str] = []
    kwargs = _typed_fields(RunConfig, raw, "", problems, overridden)  # leaves out what is mistyped: defaults stand in
    try:
        config = RunConfig(**kwargs)
    except ConfigError as err:
        problems += err.problems
    if not problems:
        return config
    located = [_locate(problem, path, lines, overridden) for problem in problems]
    raise ConfigError.of(located)


_KEY = re.compile(r"[A-Za-z_][\w.]*")


def _locate(problem: str, path: Path | None, lines: KeyLines, overridden: dict[str, str]) -> str:
    """'train.lr: ...' as 'FILE:LINE: train.lr: ...', or '--train.lr: ...' when an override set it."""
    match = _KEY.match(problem)
    key = match.group() if match else ""
    if key in overridden:
        return f"--{problem}"
    # an override that made the section (--nosuch.key) or set it whole (--preference '{gamma: 1}')
    given = sorted(o for o in overridden if key and (o.startswith(f"{key}.") or key.startswith(f"{o}.")))
    if given:
        return f"--{given[0]}: {problem}"
    line = lines.get(tuple(key.split("."))) if key else None
    where = f"{path}:{line}" if path is not None and line else str(path or "config")
    return f"{where}: {problem}"


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """['--train.lr', '0.01', '--lora.r=4'] -> [('train.lr', 0.01), ('lora.r', 4)]; values read as YAML."""
    out = []
    for key, value, _ in _overrides(args):
        if isinstance(value, NotYaml):
            raise ConfigError(f"--{key}: {value}")
        out.append((key, value))
    return out


class NotYaml(str):
    """An override's value that YAML cannot read: what is wrong with it, kept until the setting's type is known (a
    text setting takes the text as typed anyway)."""


def _overrides(args: list[str]) -> list[tuple[str, object, str]]:
    """parse_overrides' (key, value) pairs, each with the value's text as given; a value YAML cannot read is a
    NotYaml."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg}: missing its value")
        out.append((key.replace("-", "_"), _override_value(key, value), value))
    return out


def _override_value(key: str, text: str):
    try:
        value = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a safe loader: SafeLoader's subclass)
    except yaml.YAMLError as err:
        return NotYaml(f"{text!r} is not a valid YAML value ({yaml_problem(err)})")
    except RecursionError:
        return NotYaml("the value is nested too deeply to read")
    except TAG_ERRORS:
        return NotYaml(f"{text[:80]!r} is not a valid YAML value (a tagged value that cannot be read)")
    if (value is None or isinstance(value, str)) and value != text.strip() and text.strip() not in NULLS \
            and not text.lstrip().startswith(("'", '"', "[", "{")):
        return text  # a word or sentence as written: on the command line '#' starts no comment ('### Answer:')
    return value


def _typed_fields(cls, raw: dict, prefix: str, problems: list[str], overridden: dict[str, str] | None = None) -> dict:
    from lorakit.config_checks import CHOICES  # it imports the task registry: read when a config is

    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(known))}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    out = {}
    for name in known & set(raw):
        hint, value, where = hints[name], raw[name], f"{prefix}{name}"
        text = (overridden or {}).get(where)
        if text is not None and _text_only(hint) and text.strip().lower() not in YAML_WORDS \
                and not (isinstance(value, str) and not isinstance(value, NotYaml) and text.lstrip()[:1] in "'\""):
            value = text  # a text setting on the command line: the text as typed ('[INST] {instruction} [/INST]')
        elif isinstance(value, NotYaml):
            problems.append(f"{where}: {value}")
            continue
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping, given {_shown(value)}")
                continue
            sub = _typed_fields(hint, value, f"{where}.", problems, overridden)
            try:
                out[name] = hint(**sub)
            except ConfigError as err:
                problems.extend(err.problems)
            continue
        value = _coerce(value, hint, CHOICES.get((cls.__name__, name), ()))
        if not _matches(value, hint):  # left out: later checks never see a value of the wrong type
            problems.append(f"{where}: given {_shown(value)}, expected {_type_name(hint)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: given {value!r}, expected a finite number")
        elif _unusable_text(value):  # YAML can spell "\0" and "\uD800"; no path or tokenizer takes them
            problems.append(f"{where}: given {_shown(value)}, expected text without NUL characters or lone surrogates")
        else:
            out[name] = value
    return out


def _unusable_text(value) -> bool:
    """Whether a string in `value` (a list's items, a mapping's keys and values too) holds NUL or a lone surrogate."""
    if isinstance(value, str):
        return "\x00" in value or _SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(_unusable_text(v) for v in value)
    if isinstance(value, dict):
        return any(_unusable_text(k) or _unusable_text(v) for k, v in value.items())
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


NULLS = ("", "~", "null", "Null", "NULL")
# what an override of a text setting still means as YAML: null, and the booleans (refused there, as in a file)
YAML_WORDS = {w.lower() for w in NULLS} | {"true", "false", "yes", "no", "on", "off"}
BOOLEAN_WORDS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}  # YAML 1.1's, for bools


def _coerce(value, hint, choices=()):
    """A number given as a string ('1e-3' quoted) where a float is expected, a boolean where one of the setting's
    `choices` is its word (false is 'no' or 'off', e.g. `save_strategy: false`), and yes/no/on/off where a boolean is
    expected."""
    if isinstance(value, bool) and not _matches(value, hint):
        word = next((w for w in (("yes", "on") if value else ("no", "off")) if w in choices), None)
        return value if word is None else word
    if isinstance(value, str) and value.lower() in BOOLEAN_WORDS and not _matches(value, hint) and _matches(True, hint):
        return BOOLEAN_WORDS[value.lower()]
    if isinstance(value, str) and _matches(1.0, hint) and not _matches(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and hint is float:
        return float(value)
    return value


def _text_only(hint) -> bool:
    """Whether a setting takes text and nothing else (null aside): str, or str | None."""
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(hint, "__name__", str(hint)).replace("list", "a list").replace("dict", "a mapping")
