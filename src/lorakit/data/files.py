"""Read data files into records: JSONL, JSON (one array of objects), CSV or TSV (header row),
or a Hugging Face dataset split. Every record remembers its file and line (``lorakit.data.formats.where``)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from lorakit.data.formats import LINE_KEY, SOURCE_KEY, DataError, json_type

logger = logging.getLogger(__name__)

FILE_FORMATS = ("jsonl", "json", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
# Line ends: LF, CRLF or a lone CR (old Mac files). JSON strings cannot hold a raw CR or LF, so splitting
# JSON text on them never cuts a value (U+2028 and U+2029, which JSON allows in strings, are not line ends).
_LINE_END = re.compile(r"\r\n?|\n")


def load_records(path: str | Path, *, fmt: str | None = None) -> list[dict[str, Any]]:
    """Read every record of a JSONL, JSON, CSV or TSV file.

    Blank lines are skipped, a UTF-8 byte-order mark is accepted, and lines may end in LF, CRLF or CR.
    A ``.json`` file whose first character is ``{`` is read as JSON lines (``datasets.Dataset.to_json``
    writes those). A JSON object that repeats a key, a string that is not valid Unicode (a lone
    surrogate escape such as ``\\ud800``) and nesting too deep to read are refused, naming the line.

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
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a data file (.jsonl, .json, .csv or .tsv)")
    if not path.is_file():
        where = "" if path.is_absolute() else (
            f" (looked for {path.absolute()}: a relative path starts at the current folder)")
        raise FileNotFoundError(f"data file not found: {path}{where}")
    source = str(path)
    fmt = _file_format(path, fmt)
    text = decode_utf8(path.read_bytes(), source)
    if fmt == "json" and text.lstrip().startswith("{"):
        logger.info("%s starts with '{', reading it as JSON lines", source)
        fmt = "jsonl"
    if fmt == "jsonl":
        records = _read_jsonl(text, source)
    elif fmt == "json":
        records = _read_json_array(_LINE_END.sub("\n", text), source)
    else:  # CSV keeps its line ends: a quoted field may hold a CRLF of its own
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
            f"rename it with one of {', '.join(_SUFFIXES)} (or, calling load_records, pass fmt= one of "
            f"{', '.join(FILE_FORMATS)})"
        )
    return _SUFFIXES[suffix]


def split_lines(text: str) -> list[str]:
    """The lines of `text` ending in LF, CRLF or CR (never U+2028 and the other breaks str.splitlines knows)."""
    return _LINE_END.split(text)


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); DataError naming the line and byte otherwise."""
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, refusing a key given twice (json would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _parse_error(err: Exception, source: str, line: int, expected: str) -> DataError:
    """The one-line DataError for what json raised while reading a value that starts on `line`."""
    if isinstance(err, json.JSONDecodeError):
        return DataError(f"{source}:{err.lineno + line - 1}: invalid JSON ({err.msg} at column {err.colno}); "
                         f"expected {expected}")
    if isinstance(err, _DuplicateKey):
        return DataError(f"{source}:{line}: the key {err.key!r} appears twice in one object; expected each key once")
    return DataError(f"{source}:{line}: JSON nested too deeply to read; expected {expected}")  # RecursionError


def _read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    for line_no, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = _DECODER.decode(line)
        except (json.JSONDecodeError, _DuplicateKey, RecursionError) as err:
            spread = _spread_over_lines(text)
            if spread:
                raise DataError(f"{source}:{line_no}: holds {spread}; expected one JSON object per line") from None
            raise _parse_error(err, source, line_no, "one JSON object per line") from None
        records.append(_as_record(value, source, line_no, _SURROGATE_ESCAPE.search(line) is not None))
    return records


def _spread_over_lines(text: str) -> str | None:
    """What a JSON Lines text that fails line by line holds, when it is valid JSON spread over lines (a
    pretty-printed object or array); None otherwise."""
    pos, values = _skip_ws(text, 0), []
    while pos < len(text):
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        values.append(value)
        pos = _skip_ws(text, end)
    if len(values) == 1 and isinstance(values[0], list):
        return "a JSON array spread over several lines (name the file .json to read it as an array of records)"
    what = "a JSON object" if len(values) == 1 else f"{len(values)} JSON values"
    return f"{what} spread over several lines (pretty-printed)" if values else None


def _read_json_array(text: str, source: str) -> list[dict[str, Any]]:
    """Parse ``[obj, obj, ...]`` element by element so each record knows its line."""
    decoder = _DECODER
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return []
    if text[pos] != "[":
        raise DataError(f"{source}:{_line_at(text, pos)}: expected a JSON array of objects ('[' first)")
    pos = _skip_ws(text, pos + 1)
    records: list[dict[str, Any]] = []
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    lines = _LineCounter(text)
    if pos < len(text) and text[pos] == "]":
        return _expect_end(text, pos + 1, source, records)
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:  # its line counts from the start of the text
            raise _parse_error(err, source, 1, "a JSON array of objects") from None
        except (_DuplicateKey, RecursionError) as err:
            raise _parse_error(err, source, lines.at(pos), "a JSON array of objects") from None
        records.append(_as_record(value, source, lines.at(pos), surrogates))
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


class _LineCounter:
    """Line numbers of increasing positions in one text, counting each stretch once (linear, not quadratic)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            return _line_at(self.text, pos)
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _as_record(value: Any, source: str, line: int, check_surrogates: bool = False) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{source}:{line}: expected a JSON object ({{...}}), got {json_type(value)}")
    bad = _lone_surrogate(value) if check_surrogates else None
    if bad is not None:
        raise DataError(f"{source}:{line}: a string holds the lone surrogate escape \\u{ord(bad):04x}, which is "
                        "not a Unicode character; expected valid UTF-16 pairs or the character itself")
    return {**value, SOURCE_KEY: source, LINE_KEY: line}


def _lone_surrogate(value: Any) -> str | None:
    """The first unpaired surrogate in any key or string of a parsed JSON value (json decodes \\ud800 to one)."""
    stack = [value]
    while stack:  # no recursion: the value may be nested as deeply as json could read
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
# Decoded UTF-8 never holds a surrogate: one in a parsed value came from an escape like this.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@contextlib.contextmanager
def wide_csv_fields():
    """Lift the csv module's 128 KiB field limit while reading (a long document is a valid field)."""
    before = csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _read_delimited(text: str, source: str, delimiter: str) -> list[dict[str, Any]]:
    with wide_csv_fields():
        return _read_rows(text, source, delimiter)


def _read_rows(text: str, source: str, delimiter: str) -> list[dict[str, Any]]:
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
