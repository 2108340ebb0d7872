"""Property tests of every data reader (Hypothesis): the records a file holds come back as written,
and any other file is refused with one DataError line naming the file (and line): never another
exception, never a hang.

Readers: JSONL, JSON, CSV and TSV (lorakit.data.files), each record format they carry (instruction,
alpaca, chat messages, ShareGPT conversations, preference pairs, text/label; see record_formats.FORMATS), the E2E release CSV, and the E2E
system-output TSV of `lorakit eval --predictions`. Each file goes the library's way up to the model:
read, check, render, tokenise (record_formats.read_file).

The "ci" profile (tests/conftest.py) runs a few fixed examples per property; run
`pytest tests/data/test_reader_properties.py --hypothesis-profile thorough` for many fresh ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from record_formats import (
    BY_NAME,
    CASES,
    FORMATS,
    TEXT,
    assert_one_line_naming,
    expected_after_reading,
    read_file,
    write_records,
)
from lorakit.data.formats import DataError
from property_support import examples, time_limit
from lorakit.tasks.e2e.files import read_outputs

LAYOUTS = [(fmt.name, layout) for fmt in FORMATS for layout in fmt.layouts]
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])


def _read_or_refuse(fmt, path: Path, layout: str, tokenize: bool = True) -> list[dict] | None:
    """The records, or None after checking the refusal is one DataError line naming the file."""
    try:
        return read_file(fmt, path, layout, tokenize=tokenize)
    except DataError as err:
        assert_one_line_naming(err, path)
        return None


def _valid_file(draw, fmt, layout: str) -> tuple[list[dict], bytes]:
    records = draw(st.lists(fmt.records, min_size=1, max_size=4))
    data = write_records(
        records, layout, fmt.columns, line_end=draw(LINE_ENDS), bom=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])), ascii_only=draw(st.booleans()),
    )
    return records, data


@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
@given(data=st.data())
def test_valid_records_round_trip(tmp_path, name, layout, data):
    """Any valid records, written with LF, CRLF or CR line ends, with or without a BOM, read back equal."""
    fmt = BY_NAME[name]
    records, raw = _valid_file(data.draw, fmt, layout)
    path = tmp_path / f"data{fmt.suffix(layout)}"
    path.write_bytes(raw)
    assert read_file(fmt, path, layout) == expected_after_reading(fmt, layout, records)


@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
@examples(0.2)  # each example reads the file once per byte
@given(data=st.data())
def test_a_file_cut_at_any_byte_reads_or_is_refused_in_one_line(tmp_path, name, layout, data):
    """Read and checked (not tokenised: any text tokenises) at every length from 0 to the whole file."""
    fmt = BY_NAME[name]
    _, raw = _valid_file(data.draw, fmt, layout)
    path = tmp_path / f"data{fmt.suffix(layout)}"
    for end in range(len(raw)):
        path.write_bytes(raw[:end])
        _read_or_refuse(fmt, path, layout, tokenize=False)


@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))))
def test_random_bytes_read_or_are_refused_in_one_line(tmp_path, name, layout, raw):
    fmt = BY_NAME[name]
    path = tmp_path / f"data{fmt.suffix(layout)}"
    path.write_bytes(raw)
    records = _read_or_refuse(fmt, path, layout)  # a refusal is checked inside: one DataError line naming the file
    assert records is None or all(isinstance(r, dict) for r in records)


# Values of every JSON type, including ones no field accepts: wrong types, huge and deeply nested.
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


def _field_paths(value, prefix=()) -> list[tuple]:
    """Every path to a value inside a record (keys and list indices), the record itself excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += _field_paths(child, (*prefix, key))
    return out


def _replaced(record, path: tuple, value):
    if not path:
        return value
    copy = dict(record) if isinstance(record, dict) else list(record)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], value)
    return copy


JSON_LAYOUTS = [(n, layout) for n, layout in LAYOUTS if layout in ("jsonl", "json")]


@pytest.mark.parametrize(("name", "layout"), JSON_LAYOUTS)
@given(data=st.data())
def test_a_wrong_type_in_any_field_is_refused_naming_its_line(tmp_path, name, layout, data):
    """Any field of any record (nested ones too) given a value of another type: the reader either takes
    it (an alpaca input of null, say) or names that record's line."""
    fmt = BY_NAME[name]
    records = data.draw(st.lists(fmt.records, min_size=1, max_size=3))
    index = data.draw(st.integers(0, len(records) - 1))
    field = data.draw(st.sampled_from(_field_paths(records[index])))
    records[index] = _replaced(records[index], field, data.draw(JSON_VALUES))
    path = tmp_path / f"data.{layout}"
    path.write_bytes(write_records(records, layout, fmt.columns, indent=data.draw(st.sampled_from([None, 1]))))
    try:
        read_file(fmt, path, layout)
    except DataError as err:
        assert_one_line_naming(err, path)
        if layout == "jsonl":
            assert str(err).startswith(f"{path}:{index + 1}: "), (str(err), index)


@pytest.mark.parametrize(("name", "layout"), JSON_LAYOUTS)
@examples(0.5)
@given(data=st.data())
def test_a_repeated_key_is_refused_naming_its_line(tmp_path, name, layout, data):
    """JSON lets an object repeat a key and keeps the last; a data file that does so is refused."""
    fmt = BY_NAME[name]
    records = data.draw(st.lists(fmt.records, min_size=1, max_size=3))
    index = data.draw(st.integers(0, len(records) - 1))
    key = data.draw(st.sampled_from(sorted(records[index])))
    text = write_records(records, layout, fmt.columns).decode()
    lines = text.split("\n") if layout == "jsonl" else None
    if layout == "jsonl":
        lines[index] = lines[index].replace("{", "{" + json.dumps(key) + ": 1, ", 1)
        text = "\n".join(lines)
    else:
        text = text.replace("{", "{" + json.dumps(key) + ": 1, ", 1)
        index = 0
    path = tmp_path / f"data.{layout}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="appears twice in one object") as err:
        read_file(fmt, path, layout)
    assert_one_line_naming(err.value, path)
    assert str(err.value).startswith(f"{path}:{index + 1}: ")


@pytest.mark.parametrize("layout", ["jsonl", "json"])
@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deep_nesting_reads_or_is_refused_without_a_recursion_error(tmp_path, layout, depth):
    nested = "[" * depth + "]" * depth
    line = '{"instruction": "a", "output": "b", "extra": ' + nested + "}"
    path = tmp_path / f"data.{layout}"
    path.write_text(line if layout == "jsonl" else f"[{line}]")
    try:
        records = read_file(BY_NAME["instruction"], path, layout)
    except DataError as err:
        assert_one_line_naming(err, path)
        assert "nested too deeply" in str(err) and depth > 10
    else:
        assert records[0]["output"] == "b"


@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
def test_huge_fields_round_trip(tmp_path, name, layout):
    """A 200 kB field (over the csv module's default 128 KiB limit) and a line of 20,000 emoji, read and
    checked (tokenising them only measures the tokenizer)."""
    fmt = BY_NAME[name]
    huge = "x" * 200_000
    records = {
        "instruction": [{"instruction": huge, "output": "\U0001f600" * 20_000}],
        "alpaca": [{"instruction": "a", "input": huge, "output": "b"}],
        "chat": [{"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "b"}]}],
        "sharegpt": [{"conversations": [{"from": "human", "value": huge}, {"from": "gpt", "value": "b"}]}],
        "preference": [{"prompt": huge, "chosen": "\U0001f600" * 20_000, "rejected": "b"}],
        "text_label": [{"text": huge, "label": "pos"}],
        "e2e": [{"mr": "name[" + huge + "]", "ref": "b"}],
    }[name]
    path = tmp_path / f"data{fmt.suffix(layout)}"
    path.write_bytes(write_records(records, layout, fmt.columns))
    assert read_file(fmt, path, layout, tokenize=False) == expected_after_reading(fmt, layout, records)


@pytest.mark.parametrize("layout", ["jsonl", "json"])
@given(data=st.data())
def test_a_lone_surrogate_escape_is_refused_naming_its_line(tmp_path, layout, data):
    """JSON may spell a lone surrogate (\\ud800), which no UTF-8 text or tokenizer can hold."""
    records = data.draw(st.lists(BY_NAME["instruction"].records, min_size=1, max_size=3))
    index = data.draw(st.integers(0, len(records) - 1))
    escape = data.draw(st.sampled_from(["\\ud800", "\\udfff", "\\uDBFF", "\\ude00x"]))
    encoded = [json.dumps(r) for r in records]
    encoded[index] = encoded[index].replace('"output": "', '"output": "' + escape, 1)
    text = "\n".join(encoded) if layout == "jsonl" else "[\n" + ",\n".join(encoded) + "\n]"
    path = tmp_path / f"data.{layout}"
    path.write_text(text)
    with pytest.raises(DataError, match="lone surrogate") as err:
        read_file(BY_NAME["instruction"], path, layout)
    line = index + 1 if layout == "jsonl" else index + 2
    assert str(err.value).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------- E2E system outputs (TSV)
OUTPUT_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\r\n\"\ufeff"),
                      min_size=1, max_size=30).filter(lambda t: t.strip() == t and t)


@given(rows=st.lists(st.tuples(OUTPUT_TEXT, OUTPUT_TEXT), min_size=1, max_size=5, unique_by=lambda r: r[0]),
       line_end=LINE_ENDS, bom=st.booleans())
def test_e2e_outputs_round_trip(tmp_path, rows, line_end, bom):
    from lorakit.tasks.e2e.files import repair

    rows = [(mr, out) for mr, out in rows if repair(mr) == mr and repair(out) == out]
    text = ("\ufeff" if bom else "") + line_end.join(["MR\toutput", *(f"{mr}\t{out}" for mr, out in rows)])
    path = tmp_path / "outputs.tsv"
    path.write_bytes(text.encode())
    CASES["e2e-outputs/tsv"] += 1
    try:
        got = read_outputs(path)
    except DataError as err:
        assert not rows and "no outputs after the header" in str(err)
        return
    assert (got.mrs, got.outputs) == ([mr for mr, _ in rows], [out for _, out in rows])


@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))))
@example(raw=b'MR\toutput\n"a\tb\n')
def test_e2e_outputs_random_bytes_read_or_are_refused_in_one_line(tmp_path, raw):
    path = tmp_path / "outputs.tsv"
    path.write_bytes(b"MR\toutput\n" + raw)
    CASES["e2e-outputs/tsv"] += 1
    with time_limit(20):
        try:
            read_outputs(path)
        except DataError as err:
            assert_one_line_naming(err, path)
