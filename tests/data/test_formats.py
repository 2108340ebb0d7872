"""Reading data files and checking records: formats.py."""

import json
import sys
from pathlib import Path

import pytest

from lorakit.data import formats
from lorakit.data.formats import DataError, detect_format, load_hf_dataset, load_records, validate_records


GOOD = '{"instruction": "a", "output": "b"}'


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error spans lines: {message!r}"
    return message


# --------------------------------------------------------------------------- each file format loads


def test_jsonl_loads_and_keeps_line_numbers_across_blank_lines(tmp_path):
    path = write(
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
    path = write(tmp_path, "d.json", json.dumps(data, indent=2))
    records = load_records(path)
    assert [formats.public_fields(r) for r in records] == data
    lines = path.read_text().split("\n")
    assert [lines[r["_line"] - 1].strip() for r in records] == ["{", "{"]
    assert records[1]["_line"] > records[0]["_line"] > 1


def test_json_suffix_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write(tmp_path, "d.json", GOOD + '\n{"instruction": "c", "output": "d"}')
    assert [r["_line"] for r in load_records(path)] == [1, 2]


def test_csv_loads_with_header_and_multiline_quoted_field(tmp_path):
    path = write(tmp_path, "d.csv", 'instruction,input,output\nsay hi,,"hi,\nthere"\n\nlist,x,ros2 list\n')
    records = load_records(path)
    assert [formats.public_fields(r) for r in records] == [
        {"instruction": "say hi", "input": "", "output": "hi,\nthere"},
        {"instruction": "list", "input": "x", "output": "ros2 list"},
    ]
    assert [r["_line"] for r in records] == [2, 5]


def test_tsv_loads(tmp_path):
    path = write(tmp_path, "d.tsv", "instruction\toutput\nlist topics\tros2 topic list\n")
    (record,) = load_records(path)
    assert formats.public_fields(record) == {"instruction": "list topics", "output": "ros2 topic list"}
    assert record["_line"] == 2


def test_fmt_overrides_the_suffix(tmp_path):
    path = write(tmp_path, "d.txt", '{"instruction": "a", "output": "b"}\n')
    assert load_records(path, fmt="jsonl")[0]["output"] == "b"


@pytest.mark.parametrize(
    ("name", "body"),
    [("d.jsonl", '{"instruction": "a", "output": "b"}\n'), ("d.csv", "instruction,output\na,b\n")],
)
def test_utf8_bom_is_accepted(tmp_path, name, body):
    path = write(tmp_path, name, b"\xef\xbb\xbf" + body.encode())
    (record,) = load_records(path)
    assert record["instruction"] == "a"  # not "\ufeffinstruction"


# --------------------------------------------------------------------------- bad files


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", GOOD + '\n{"instruction": "a" "output": "b"}\n')
    message = error_of(load_records, path)
    assert message.startswith(f"{path}:2: invalid JSON")
    assert "expected one JSON object per line" in message


def test_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n\n["a", "b"]\n')
    assert error_of(load_records, path) == f"{path}:3: expected a JSON object ({{...}}), got an array"


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = write(tmp_path, "latin1.jsonl", b'{"a": "1"}\n{"a": "2"}\n{"a": "caf\xe9"}\n')
    message = error_of(load_records, path)
    assert message.startswith(f"{path}:3: byte 0xe9 at column 11 is not valid UTF-8")
    assert "expected UTF-8" in message


@pytest.mark.parametrize("body", ["", "\n  \n\n", "[]", " [ ] \n"])
def test_empty_data_set_is_an_error(tmp_path, body):
    suffix = "json" if "[" in body else "jsonl"
    path = write(tmp_path, f"empty.{suffix}", body)
    assert error_of(load_records, path).startswith(f"{path}: no records found")


def test_csv_with_header_only_is_empty(tmp_path):
    path = write(tmp_path, "h.csv", "instruction,output\n")
    assert "no records found" in error_of(load_records, path)


def test_unknown_suffix_and_unknown_fmt(tmp_path):
    path = write(tmp_path, "d.txt", "x")
    message = error_of(load_records, path)
    assert "cannot tell the file format from the suffix '.txt'" in message and "jsonl" in message
    assert "unknown file format 'yaml'; expected one of jsonl, json, csv, tsv" in error_of(
        load_records, path, fmt="yaml"
    )


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_json_that_is_not_an_array(tmp_path):
    path = write(tmp_path, "d.json", '\n"just a string"\n')
    assert error_of(load_records, path) == f"{path}:2: expected a JSON array of objects ('[' first)"


def test_json_array_element_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"instruction": "a", "output": "b"},\n  42\n]\n')
    assert error_of(load_records, path) == f"{path}:3: expected a JSON object ({{...}}), got a number"


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "d.json", f'[\n  {GOOD},\n  {{"instruction": "c",, }}\n]')
    assert error_of(load_records, path).startswith(f"{path}:3: invalid JSON")


def test_json_array_missing_comma(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"a": "1"}\n  {"a": "2"}\n]')
    assert error_of(load_records, path) == f"{path}:3: expected ',' or ']' after an array element"


def test_csv_row_with_wrong_column_count(tmp_path):
    path = write(tmp_path, "d.csv", "instruction,output\na,b\nc,d,e\n")
    assert error_of(load_records, path) == f"{path}:3: expected 2 CSV columns (instruction, output), got 3"


def test_csv_header_with_duplicate_column(tmp_path):
    path = write(tmp_path, "d.csv", "output,output\na,b\n")
    assert error_of(load_records, path) == f"{path}:1: the CSV header repeats output"


def test_load_hf_dataset_without_datasets_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError) as info:
        load_hf_dataset("tatsu-lab/alpaca", "train")
    message = str(info.value)
    assert "\n" not in message
    assert "'tatsu-lab/alpaca'" in message and "pip install datasets" in message


# --------------------------------------------------------------------------- record formats


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "a", "output": "b"}, "instruction"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat"),
        ({"text": "good film", "label": "pos"}, "text_label"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_unknown_fields_names_them():
    message = error_of(detect_format, {"prompt": "a", "completion": "b", "_source": "d.jsonl", "_line": 4})
    assert message.startswith("d.jsonl:4: cannot tell the record format from its fields (completion, prompt)")


def test_validate_from_real_file_detects_and_mixes_instruction_with_alpaca(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": null, "output": "b"}\n',
    )
    assert validate_records(load_records(path)) == "alpaca"


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    message = error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:2: field 'output' is missing (expected a string)"


def test_missing_csv_column_names_the_first_data_line(tmp_path):
    path = write(tmp_path, "d.csv", "instruction,answer\na,b\n")
    message = error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:2: field 'output' is missing (expected a string)"


def test_wrong_type_names_the_value(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": 42}\n')
    message = error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:1: field 'output' is a number 42 (expected a string)"


def test_null_field_is_reported_as_null(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": null, "output": "b"}\n')
    message = error_of(validate_records, load_records(path))
    assert message.endswith("field 'instruction' is null (expected a string)")


def test_alpaca_input_of_wrong_type(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "input": ["x"], "output": "b"}\n')
    message = error_of(validate_records, load_records(path), "alpaca")
    expected = "field 'input' is an array ['x'] (expected a string, possibly empty, or no field)"
    assert message == f"{path}:1: {expected}"


def test_instruction_format_refuses_a_set_input(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "input": "ctx", "output": "b"}\n')
    message = error_of(validate_records, load_records(path), "instruction")
    assert message.startswith(f"{path}:1: field 'input' is set") and "use format 'alpaca'" in message


def test_chat_record_checks(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ends_with_user = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    bad_role = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    no_content = {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}
    alone = {"messages": [{"role": "assistant", "content": "y"}]}
    lines = [good, ends_with_user, bad_role, no_content, {"messages": "hi"}, alone]
    for i, record in enumerate(lines):
        path = write(tmp_path, f"c{i}.jsonl", json.dumps(good) + "\n" + json.dumps(record) + "\n")
        records = load_records(path)
        if i == 0:
            assert validate_records(records) == "chat"
            continue
        message = error_of(validate_records, records, "chat")
        assert message.startswith(f"{path}:2: ")
        expected = [
            None,
            "the last message is the 'user' one; expected the conversation to end with an 'assistant'",
            "field 'messages[0].role' is a string 'robot' (expected one of 'system', 'user', 'assistant'",
            "field 'messages[0].content' is missing (expected a string)",
            "field 'messages' is a string 'hi' (expected a non-empty list of {role, content})",
            "field 'messages' holds only the assistant's reply; expected at least one system or user message",
        ][i]
        assert expected in message


def test_mixed_formats_are_an_error(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n',
    )
    message = error_of(validate_records, load_records(path))
    assert message.startswith(f"{path}:2: record format 'chat' differs from 'instruction' (line 1)")


def test_unknown_record_format():
    assert "unknown record format 'qa'; expected one of instruction, alpaca, chat, text_label" in error_of(
        validate_records, [{"instruction": "a", "output": "b"}], "qa"
    )


def test_text_label_is_a_hook_until_a_validator_is_registered(monkeypatch):
    records = [{"text": "good", "label": "pos", "_source": "s.csv", "_line": 2}]
    assert "no validator registered" in error_of(validate_records, records)

    monkeypatch.setattr(formats, "_VALIDATORS", dict(formats._VALIDATORS))  # undone after the test
    seen = []
    formats.register_validator("text_label", lambda record, at: seen.append(at))
    assert validate_records(records) == "text_label"
    assert seen == ["s.csv:2"]
