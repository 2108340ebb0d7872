"""Read data files into records: JSONL, JSON (one array of objects), CSV or TSV (header row),
or a Hugging Face dataset split. Every record remembers its file and line (``lorakit.data.formats.where``)."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from lorakit.data.formats import LINE_KEY, SOURCE_KEY, DataError, json_type

logger = logging.getLogger(__name__)

FILE_FORMATS = ("jsonl", "json", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


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
        raise DataError(f"{source}:{line}: expected a JSON object ({{...}}), got {json_type(value)}")
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
