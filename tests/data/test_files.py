"""Reading data files: files.py (JSONL, JSON, CSV, TSV, a Hub dataset), each problem one line naming file and line."""

import json
import sys

import pytest
from conftest import data_error_of, write_file

from lorakit.data.files import load_hf_dataset, load_records
from lorakit.data.formats import public_fields

GOOD = '{"instruction": "a", "output": "b"}'


# --------------------------------------------------------------------------- each file format loads


def test_jsonl_loads_and_keeps_line_numbers_across_blank_lines(tmp_path):
    path = write_file(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n\n   \n{"instruction": "c", "output": "d"}\r\n',
    )
    records = load_records(path)
    assert [r["instruction"] for r in records] == ["a", "c"]
    assert [r["_line"] for r in records] == [1, 4]
    assert records[0]["_source"] == str(path)


def test_json_array_records_know_their_line(tmp_path):
    data = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    path = write_file(tmp_path, "d.json", json.dumps(data, indent=2))
    records = load_records(path)
    assert [public_fields(r) for r in records] == data
    lines = path.read_text().split("\n")
    assert [lines[r["_line"] - 1].strip() for r in records] == ["{", "{"]
    assert records[1]["_line"] > records[0]["_line"] > 1


def test_json_suffix_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write_file(tmp_path, "d.json", GOOD + '\n{"instruction": "c", "output": "d"}')
    assert [r["_line"] for r in load_records(path)] == [1, 2]


def test_csv_loads_with_header_and_multiline_quoted_field(tmp_path):
    path = write_file(tmp_path, "d.csv", 'instruction,input,output\nsay hi,,"hi,\nthere"\n\nlist,x,ros2 list\n')
    records = load_records(path)
    assert [public_fields(r) for r in records] == [
        {"instruction": "say hi", "input": "", "output": "hi,\nthere"},
        {"instruction": "list", "input": "x", "output": "ros2 list"},
    ]
    assert [r["_line"] for r in records] == [2, 5]


def test_tsv_loads(tmp_path):
    path = write_file(tmp_path, "d.tsv", "instruction\toutput\nlist topics\tros2 topic list\n")
    (record,) = load_records(path)
    assert public_fields(record) == {"instruction": "list topics", "output": "ros2 topic list"}
    assert record["_line"] == 2


def test_fmt_overrides_the_suffix(tmp_path):
    path = write_file(tmp_path, "d.txt", '{"instruction": "a", "output": "b"}\n')
    assert load_records(path, fmt="jsonl")[0]["output"] == "b"


@pytest.mark.parametrize(
    ("name", "body"),
    [("d.jsonl", '{"instruction": "a", "output": "b"}\n'), ("d.csv", "instruction,output\na,b\n")],
)
def test_utf8_bom_is_accepted(tmp_path, name, body):
    path = write_file(tmp_path, name, b"\xef\xbb\xbf" + body.encode())
    (record,) = load_records(path)
    assert record["instruction"] == "a"  # not "\ufeffinstruction"


# --------------------------------------------------------------------------- bad files


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_file(tmp_path, "bad.jsonl", GOOD + '\n{"instruction": "a" "output": "b"}\n')
    message = data_error_of(load_records, path)
    assert message.startswith(f"{path}:2: invalid JSON")
    assert "expected one JSON object per line" in message


@pytest.mark.parametrize(("body", "what"), [
    (json.dumps({"instruction": "a", "output": "b"}, indent=2), "a JSON object spread over several lines (pretty-printed)"),
    (json.dumps([{"instruction": "a", "output": "b"}], indent=2),
     "a JSON array spread over several lines (name the file .json to read it as an array of records)"),
    (json.dumps({"instruction": "a"}, indent=1) + json.dumps({"instruction": "b"}, indent=1),
     "2 JSON values spread over several lines (pretty-printed)"),
])
def test_pretty_printed_json_in_a_jsonl_file_is_named_as_such(tmp_path, body, what):
    path = write_file(tmp_path, "pretty.jsonl", body)
    assert data_error_of(load_records, path) == f"{path}:1: holds {what}; expected one JSON object per line"


def test_line_that_is_not_an_object(tmp_path):
    path = write_file(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n\n["a", "b"]\n')
    assert data_error_of(load_records, path) == f"{path}:3: expected a JSON object ({{...}}), got an array"


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = write_file(tmp_path, "latin1.jsonl", b'{"a": "1"}\n{"a": "2"}\n{"a": "caf\xe9"}\n')
    message = data_error_of(load_records, path)
    assert message.startswith(f"{path}:3: byte 0xe9 at column 11 is not valid UTF-8")
    assert "expected UTF-8" in message


@pytest.mark.parametrize("body", ["", "\n  \n\n", "[]", " [ ] \n"])
def test_empty_data_set_is_an_error(tmp_path, body):
    suffix = "json" if "[" in body else "jsonl"
    path = write_file(tmp_path, f"empty.{suffix}", body)
    assert data_error_of(load_records, path).startswith(f"{path}: no records found")


def test_csv_with_header_only_is_empty(tmp_path):
    path = write_file(tmp_path, "h.csv", "instruction,output\n")
    assert "no records found" in data_error_of(load_records, path)


def test_unknown_suffix_and_unknown_fmt(tmp_path):
    path = write_file(tmp_path, "d.txt", "x")
    message = data_error_of(load_records, path)
    assert "cannot tell the file format from the suffix '.txt'" in message and "jsonl" in message
    assert "unknown file format 'yaml'; expected one of jsonl, json, csv, tsv" in data_error_of(
        load_records, path, fmt="yaml"
    )


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_a_folder_is_named_as_one(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    assert data_error_of(load_records, tmp_path / "data.jsonl") == (
        f"{tmp_path / 'data.jsonl'}: is a folder; expected a data file (.jsonl, .json, .csv or .tsv)")


def test_json_that_is_not_an_array(tmp_path):
    path = write_file(tmp_path, "d.json", '\n"just a string"\n')
    assert data_error_of(load_records, path) == f"{path}:2: expected a JSON array of objects ('[' first)"


def test_json_array_element_that_is_not_an_object(tmp_path):
    path = write_file(tmp_path, "d.json", '[\n  {"instruction": "a", "output": "b"},\n  42\n]\n')
    assert data_error_of(load_records, path) == f"{path}:3: expected a JSON object ({{...}}), got a number"


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = write_file(tmp_path, "d.json", f'[\n  {GOOD},\n  {{"instruction": "c",, }}\n]')
    assert data_error_of(load_records, path).startswith(f"{path}:3: invalid JSON")


def test_json_array_missing_comma(tmp_path):
    path = write_file(tmp_path, "d.json", '[\n  {"a": "1"}\n  {"a": "2"}\n]')
    assert data_error_of(load_records, path) == f"{path}:3: expected ',' or ']' after an array element"


def test_csv_row_with_wrong_column_count(tmp_path):
    path = write_file(tmp_path, "d.csv", "instruction,output\na,b\nc,d,e\n")
    assert data_error_of(load_records, path) == f"{path}:3: expected 2 CSV columns (instruction, output), got 3"


def test_csv_header_with_duplicate_column(tmp_path):
    path = write_file(tmp_path, "d.csv", "output,output\na,b\n")
    assert data_error_of(load_records, path) == f"{path}:1: the CSV header repeats output"


def test_load_hf_dataset_without_datasets_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError) as info:
        load_hf_dataset("tatsu-lab/alpaca", "train")
    message = str(info.value)
    assert "\n" not in message
    assert "'tatsu-lab/alpaca'" in message and "pip install datasets" in message


