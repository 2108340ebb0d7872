"""Reading a run config: YAML, then dotted CLI overrides, then typed dataclasses; every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from lorakit.config import ConfigError, RunConfig


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--section.key value` overrides, and validate it.

    Raises:
        ConfigError: one message listing every unknown key, wrong type or value out of range.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, eval)")
    for key, value in parse_overrides(overrides or []):
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: '{part}' is not a section")
        node[leaf] = value
    problems: list[str] = []
    kwargs = _typed_fields(RunConfig, raw, "", problems)
    if problems:
        raise ConfigError(f"{path or 'config'}: " + "; ".join(problems))
    try:
        return RunConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """['--train.lr', '0.01', '--lora.r=4'] -> [('train.lr', 0.01), ('lora.r', 4)]; values read as YAML."""
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
        out.append((key.replace("-", "_"), yaml.safe_load(value)))
    return out


def _typed_fields(cls, raw: dict, prefix: str, problems: list[str]) -> dict:
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
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping, given {value!r}")
                continue
            sub = _typed_fields(hint, value, f"{where}.", problems)
            try:
                out[name] = hint(**sub)
            except ConfigError as err:
                problems.append(str(err))
            continue
        value = _coerce(value, hint)
        if not _matches(value, hint):
            problems.append(f"{where}: given {value!r}, expected {_type_name(hint)}")
        out[name] = value
    return out


def _coerce(value, hint):
    """YAML reads `1e-3` as a string (accepted where a float is expected) and a bare `no` as false
    (read back as 'no' where only a string fits, e.g. `save_strategy: no`)."""
    if isinstance(value, bool) and not _matches(value, hint) and _matches("no", hint):
        return "yes" if value else "no"
    if isinstance(value, str) and _matches(1.0, hint) and not _matches(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and hint is float:
        return float(value)
    return value


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
    return getattr(hint, "__name__", str(hint)).replace("list", "a list").replace("dict", "a mapping")
