"""A YAML config file read strictly: UTF-8 text, each key once per mapping, and the line of every key
kept so that a problem with a value can name `FILE:LINE`.

PyYAML's safe loader keeps the last of two equal keys without a word (`lr: 1e-3` ... `lr: 1e-4`);
here that is an error naming both lines. Every failure is a one-line `ConfigError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lorakit.config import ConfigError


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans and numbers. Only true/false are booleans: YAML 1.1 also reads
    yes/no/on/off so, which turned `half_base: off` into False; here they stay words, and a boolean setting still
    takes them (config_loading._coerce). Integers are decimal (0042 is 42) unless 0x or 0o says otherwise."""


BOOL, INT, FLOAT = (f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float"))
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (BOOL, INT, FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's numbers too: decimal integers (0042 is 42, where YAML 1.1 read it as octal 34), 0x and 0o ones, and
# floats without YAML 1.1's base 60 (1:30 was 90.0)
ConfigLoader.add_implicit_resolver(INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
                                   list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                      r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _integer(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0x", "0o")):
        return int(text[2:], 16 if text[1] == "x" else 8)
    return int(text, 10)


ConfigLoader.add_constructor(INT, _integer)

KeyLines = dict[tuple[str, ...], int]
"""The 1-based line of each key, by its path of keys from the top (('train', 'lr') -> 12)."""


def read_yaml_mapping(path: Path) -> tuple[dict, KeyLines]:
    """The file's top-level mapping (empty for an empty file) and the line of each key in it.

    Raises:
        ConfigError: not UTF-8, not YAML, a key given twice, nesting too deep, or not a mapping.
    """
    text = _decode(path.read_bytes(), path)
    try:
        raw, lines = parse_yaml(text, path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}:{error_line(err, text)}: not valid YAML ({yaml_problem(err)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read; expected sections of key: value lines") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: expected a mapping of sections (model, lora, data, train, eval), "
                          f"given {type(raw).__name__}")
    return raw, lines


def parse_yaml(text: str, path: Path) -> tuple[object, KeyLines]:
    """The document in `text` and its key lines (yaml.YAMLError, RecursionError or ConfigError if bad)."""
    loader = ConfigLoader(text)  # may raise already: it checks the characters up front
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = key_lines(node, path)
        try:
            return loader.construct_document(node), lines
        except TAG_ERRORS:  # `!!int` with no number, `!!bool maybe`
            line, problem = _unreadable_scalar(node)
            raise ConfigError(f"{path}:{line}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


TAG_ERRORS = (ValueError, LookupError, TypeError, OverflowError)
"""What PyYAML's safe constructors raise, beside YAMLError, for a tagged scalar they cannot read."""


def _unreadable_scalar(root: yaml.Node) -> tuple[int, str]:
    """The line of the first scalar PyYAML's safe constructors fail on, and what is wrong with it."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                yaml.SafeLoader("").construct_object(node)
            except Exception:  # noqa: BLE001 - whatever it raises marks the culprit
                tag = node.tag.rpartition(":")[2] or node.tag
                return node.start_mark.line + 1, f"!!{tag} {node.value[:40]!r} cannot be read as {tag}"
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in reversed(node.value) for child in reversed(pair))
    return 1, "a tagged value cannot be read"


def error_line(err: yaml.YAMLError, text: str) -> int:
    """The 1-based line a YAML error points at (1 if it points nowhere)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(err, "position", None)  # ReaderError: a character YAML does not allow
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


def yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML error says went wrong, without the where (that is the FILE:LINE in front)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"character #x{err.character:04x} is not allowed" if isinstance(err.character, int) else err.reason
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def key_lines(root: yaml.Node, path: Path) -> KeyLines:
    """Walk the node tree (iteratively; each node once, so aliases cannot blow up) for key lines and repeats."""
    lines: KeyLines = {}
    stack: list[tuple[yaml.Node, tuple[str, ...] | None]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, prefix = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, None) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key != "<<":
                    if key in first:
                        raise ConfigError(f"{path}:{line}: the key '{key}' is given twice in one mapping "
                                          f"(first on line {first[key]}); expected each key once")
                    first[key] = line
                    if prefix is not None:
                        lines[(*prefix, key)] = line
                child_prefix = (*prefix, key) if prefix is not None and key is not None else None
                stack.append((value_node, child_prefix))
    return lines


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: byte 0x{data[err.start]:02x} is not valid UTF-8; "
                          "expected a UTF-8 text file") from None
