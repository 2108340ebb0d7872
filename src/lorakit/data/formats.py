"""Read instruction-tuning data from disk and check each record's fields.

Files are JSONL, JSON (one array of objects), CSV or TSV (header row). Every record keeps where it
came from under two private keys, ``_source`` (file name) and ``_line`` (1-based line number), so
that any later error (a missing template field, say) can name ``file:line``. Every problem raises a
one-line :class:`DataError` that names the file, the line and what was expected.

Record formats (``validate_records``):

* ``instruction``: ``instruction`` and ``output`` strings.
* ``alpaca``: ``instruction``, ``output`` and ``input`` (a string; may be empty, null or missing).
* ``chat``: ``messages``, a list of ``{"role", "content"}``; the last message is the assistant's.
* ``text_label``: classification; validated by a checker registered with
  :func:`register_validator` (the classification task provides it).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_KEY = "_source"
LINE_KEY = "_line"

FILE_FORMATS = ("jsonl", "json", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}

RECORD_FORMATS = ("instruction", "alpaca", "chat", "text_label")
CHAT_ROLES = ("system", "user", "assistant", "tool")

Validator = Callable[[dict[str, Any], str], None]
"""Checks one record; the second argument is its ``file:line`` for error messages."""


class DataError(ValueError):
    """A data file or record is not what lorakit expects; the message is one line."""


def where(record: dict[str, Any], source: str | None = None) -> str:
    """Return ``file:line`` for a record loaded by this module (or the best available part)."""
    src = record.get(SOURCE_KEY, source) or "<records>"
    line = record.get(LINE_KEY)
    return f"{src}:{line}" if line is not None else str(src)


def public_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Return the record without the private ``_source``/``_line`` keys."""
    return {k: v for k, v in record.items() if k not in (SOURCE_KEY, LINE_KEY)}


# --------------------------------------------------------------------------- reading files


def load_records(path: str | Path, *, fmt: str | None = None) -> list[dict[str, Any]]:
    """Read every record of a JSONL, JSON, CSV or TSV file.

    Blank lines are skipped and a UTF-8 byte-order mark is accepted. A ``.json`` file whose first
    character is ``{`` is read as JSON lines (``datasets.Dataset.to_json`` writes those).

    Args:
        path: the data file.
        fmt: ``"jsonl"``, ``"json"``, ``"csv"`` or ``"tsv"``; by default chosen from the suffix.

    Returns:
        One dict per record, each with ``_source`` (the file name) and ``_line`` (its line).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: unknown format, undecodable bytes, bad JSON/CSV, a non-object record, or no
            records at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    source = str(path)
    fmt = _file_format(path, fmt)
    text = _decode(path.read_bytes(), source)
    if fmt == "json" and text.lstrip().startswith("{"):
        logger.info("%s starts with '{', reading it as JSON lines", source)
        fmt = "jsonl"
    if fmt == "jsonl":
        records = _read_jsonl(text, source)
    elif fmt == "json":
        records = _read_json_array(text, source)
    else:
        records = _read_delimited(text, source, delimiter="," if fmt == "csv" else "\t")
    if not records:
        raise DataError(f"{source}: no records found (the file is empty or holds only blank lines)")
    logger.info("read %d records from %s (%s)", len(records), source, fmt)
    return records


def load_hf_dataset(name: str, split: str = "train", **kwargs: Any) -> list[dict[str, Any]]:
    """Load a Hugging Face Hub dataset split as records (needs the optional ``datasets`` package).

    Args:
        name: the dataset id or local dataset folder, as ``datasets.load_dataset`` takes it.
        split: the split to read, e.g. ``"train"``.
        **kwargs: passed on to ``datasets.load_dataset`` (``name=`` for a config, ``revision=``...).

    Returns:
        One dict per row; ``_source`` is ``name[split]`` and ``_line`` the 1-based row number.

    Raises:
        ImportError: ``datasets`` is not installed.
        DataError: the split has no rows.
    """
    try:
        import datasets  # optional dependency: only this loader needs it
    except ImportError:
        raise ImportError(
            f"loading the Hub dataset {name!r} needs the 'datasets' package, which is not installed; "
            "run `pip install datasets` or export the data to a JSONL file"
        ) from None
    rows = datasets.load_dataset(name, split=split, **kwargs)
    source = f"{name}[{split}]"
    records = [{**row, SOURCE_KEY: source, LINE_KEY: i} for i, row in enumerate(rows, start=1)]
    if not records:
        raise DataError(f"{source}: no records found (the split is empty)")
    return records


def _file_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FILE_FORMATS:
            raise DataError(f"{path}: unknown file format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            f"{path}: cannot tell the file format from the suffix {suffix!r}; "
            f"use one of {', '.join(_SUFFIXES)} or pass fmt= one of {', '.join(FILE_FORMATS)}"
        )
    return _SUFFIXES[suffix]


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: drop a leading byte-order mark if present
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start]
        raise DataError(
            f"{source}:{line}: byte 0x{byte:02x} at column {err.start - line_start + 1} is not valid UTF-8; "
            "expected UTF-8 text (re-save the file as UTF-8)"
        ) from None


def _read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows in strings
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{source}:{line_no}: invalid JSON ({err.msg} at column {err.colno}); "
                "expected one JSON object per line"
            ) from None
        records.append(_as_record(value, source, line_no))
    return records


def _read_json_array(text: str, source: str) -> list[dict[str, Any]]:
    """Parse ``[obj, obj, ...]`` element by element so each record knows its line."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return []
    if text[pos] != "[":
        raise DataError(f"{source}:{_line_at(text, pos)}: expected a JSON array of objects ('[' first)")
    pos = _skip_ws(text, pos + 1)
    records: list[dict[str, Any]] = []
    if pos < len(text) and text[pos] == "]":
        return _expect_end(text, pos + 1, source, records)
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{source}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                "expected a JSON array of objects"
            ) from None
        records.append(_as_record(value, source, _line_at(text, pos)))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return _expect_end(text, pos + 1, source, records)
        else:
            raise DataError(f"{source}:{_line_at(text, pos)}: expected ',' or ']' after an array element")


def _expect_end(text: str, pos: int, source: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pos = _skip_ws(text, pos)
    if pos != len(text):
        raise DataError(f"{source}:{_line_at(text, pos)}: unexpected text after the closing ']'")
    return records


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _as_record(value: Any, source: str, line: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{source}:{line}: expected a JSON object ({{...}}), got {_json_type(value)}")
    return {**value, SOURCE_KEY: source, LINE_KEY: line}


def _read_delimited(text: str, source: str, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines; name the line the row starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{source}:{reader.line_num}: malformed {_kind(delimiter)} row ({err})") from None
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = _check_header(row, source, start, delimiter)
            continue
        if len(row) != len(header):
            raise DataError(
                f"{source}:{start}: expected {len(header)} {_kind(delimiter)} columns "
                f"({', '.join(header)}), got {len(row)}"
            )
        records.append({**dict(zip(header, row)), SOURCE_KEY: source, LINE_KEY: start})
    return records


def _check_header(row: list[str], source: str, line: int, delimiter: str) -> list[str]:
    header = [cell.strip() for cell in row]
    if any(not name for name in header):
        raise DataError(f"{source}:{line}: the {_kind(delimiter)} header has an empty column name: {row}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{source}:{line}: the {_kind(delimiter)} header repeats {', '.join(duplicates)}")
    return header


def _kind(delimiter: str) -> str:
    return "CSV" if delimiter == "," else "TSV"


# --------------------------------------------------------------------------- checking records


def detect_format(record: dict[str, Any]) -> str:
    """Name the record format a record's fields fit.

    ``messages`` → ``chat``; ``instruction`` + ``output`` → ``alpaca`` if an ``input`` field is
    present, else ``instruction``; ``text`` + ``label`` → ``text_label``.

    Raises:
        DataError: the fields fit no format.
    """
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca" if "input" in record else "instruction"
    if "text" in record and "label" in record:
        return "text_label"
    fields = ", ".join(sorted(public_fields(record))) or "none"
    raise DataError(
        f"{where(record)}: cannot tell the record format from its fields ({fields}); expected "
        "instruction+output (instruction), instruction+input+output (alpaca), messages (chat) "
        "or text+label (text_label)"
    )


def validate_records(records: list[dict[str, Any]], fmt: str | None = None, source: str | None = None) -> str:
    """Check every record's fields and types for one record format.

    Args:
        records: records as :func:`load_records` returns them.
        fmt: one of ``RECORD_FORMATS``; by default detected from the records. ``instruction`` and
            ``alpaca`` records may mix (the result is then ``alpaca``); other mixes are errors.
        source: the name used in messages for records without ``_source`` (e.g. built in code).

    Returns:
        The record format the records were checked against.

    Raises:
        DataError: no records, an unknown format, mixed formats, or a bad record (the message
            names ``file:line`` and the field).
    """
    if not records:
        raise DataError(f"{source or '<records>'}: no records to validate; expected at least one")
    if fmt is None:
        fmt = _detect_all(records, source)
    if fmt not in RECORD_FORMATS:
        raise DataError(f"unknown record format {fmt!r}; expected one of {', '.join(RECORD_FORMATS)}")
    if fmt not in _VALIDATORS:
        raise DataError(
            f"record format {fmt!r} has no validator registered; the classification task registers "
            "one with lorakit.data.formats.register_validator"
        )
    check = _VALIDATORS[fmt]
    for record in records:
        if not isinstance(record, dict):
            raise DataError(f"{source or '<records>'}: expected dict records, got {type(record).__name__}")
        check(record, where(record, source))
    return fmt


def register_validator(fmt: str, validator: Validator) -> None:
    """Install the checker for a record format (the hook the ``text_label`` task uses)."""
    if fmt not in RECORD_FORMATS:
        raise DataError(f"unknown record format {fmt!r}; expected one of {', '.join(RECORD_FORMATS)}")
    _VALIDATORS[fmt] = validator


def _detect_all(records: list[dict[str, Any]], source: str | None) -> str:
    first = detect_format(records[0])
    family = {"instruction", "alpaca"}
    found = {first}
    for record in records[1:]:
        fmt = detect_format(record)
        if fmt != first and not {fmt, first} <= family:
            raise DataError(
                f"{where(record, source)}: record format {fmt!r} differs from {first!r} "
                f"(line {records[0].get(LINE_KEY, 1)}); expected one format per data set"
            )
        found.add(fmt)
    return "alpaca" if "alpaca" in found else first


def _check_instruction(record: dict[str, Any], at: str) -> None:
    _require_str(record, "instruction", at)
    _require_str(record, "output", at)
    value = record.get("input")
    if isinstance(value, str) and value.strip():
        raise DataError(
            f"{at}: field 'input' is set but format 'instruction' has no place for it; use format 'alpaca'"
        )


def _check_alpaca(record: dict[str, Any], at: str) -> None:
    _require_str(record, "instruction", at)
    _require_str(record, "output", at)
    if record.get("input") is not None:
        _require_str(record, "input", at, hint="a string, possibly empty, or no field")


def _check_chat(record: dict[str, Any], at: str) -> None:
    messages = record.get("messages")
    if messages is None:
        raise DataError(f"{at}: field 'messages' is missing (expected a list of {{role, content}} objects)")
    if not isinstance(messages, list) or not messages:
        expected = "a non-empty list of {role, content}"
        raise DataError(f"{at}: field 'messages' is {_describe(messages)} (expected {expected})")
    roles = ", ".join(repr(r) for r in CHAT_ROLES)
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            expected = "a {role, content} object"
            raise DataError(f"{at}: field '{field}' is {_describe(message)} (expected {expected})")
        if message.get("role") not in CHAT_ROLES:
            state = "missing" if "role" not in message else _describe(message["role"])
            raise DataError(f"{at}: field '{field}.role' is {state} (expected one of {roles})")
        _require_str(message, "content", at, field=f"{field}.content")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{at}: the last message is the {messages[-1]['role']!r} one; "
            "expected the conversation to end with an 'assistant' message (the response to learn)"
        )
    if len(messages) < 2:
        raise DataError(
            f"{at}: field 'messages' holds only the assistant's reply; "
            "expected at least one system or user message before it (the prompt)"
        )


def _require_str(
    record: dict[str, Any], key: str, at: str, *, field: str | None = None, hint: str = ""
) -> None:
    field = field or key
    expected = hint or "a string"
    if key not in record:
        raise DataError(f"{at}: field '{field}' is missing (expected {expected})")
    if not isinstance(record[key], str):
        raise DataError(f"{at}: field '{field}' is {_describe(record[key])} (expected {expected})")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{_json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


_VALIDATORS: dict[str, Validator] = {
    "instruction": _check_instruction,
    "alpaca": _check_alpaca,
    "chat": _check_chat,
}
