"""Checking records against their format: formats.py."""

import json

import pytest
from conftest import data_error_of, write_file

from lorakit.data import formats
from lorakit.data.files import load_records
from lorakit.data.formats import detect_format, validate_records


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
    message = data_error_of(detect_format, {"prompt": "a", "completion": "b", "_source": "d.jsonl", "_line": 4})
    assert message.startswith("d.jsonl:4: cannot tell the record format from its fields (completion, prompt)")


def test_validate_from_real_file_detects_and_mixes_instruction_with_alpaca(tmp_path):
    path = write_file(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": null, "output": "b"}\n',
    )
    assert validate_records(load_records(path)) == "alpaca"


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_file(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    message = data_error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:2: field 'output' is missing (expected a string)"


def test_missing_csv_column_names_the_first_data_line(tmp_path):
    path = write_file(tmp_path, "d.csv", "instruction,answer\na,b\n")
    message = data_error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:2: field 'output' is missing (expected a string)"


@pytest.mark.parametrize("fmt", ["instruction", "alpaca"])
def test_an_empty_cell_names_its_line_and_field(tmp_path, fmt):
    """An empty output cell used to train the model to answer with only its end-of-sequence token."""
    path = write_file(tmp_path, "d.csv", "instruction,output\nsay red,red red\nsay blue,\n")
    assert data_error_of(validate_records, load_records(path), fmt) == f"{path}:3: field 'output' is empty (expected text)"
    path = write_file(tmp_path, "e.jsonl", '{"instruction": " ", "output": "b"}\n')
    assert data_error_of(validate_records, load_records(path), fmt) == (
        f"{path}:1: field 'instruction' is empty (expected text)")


def test_wrong_type_names_the_value(tmp_path):
    path = write_file(tmp_path, "d.jsonl", '{"instruction": "a", "output": 42}\n')
    message = data_error_of(validate_records, load_records(path), "instruction")
    assert message == f"{path}:1: field 'output' is a number 42 (expected a string)"


def test_null_field_is_reported_as_null(tmp_path):
    path = write_file(tmp_path, "d.jsonl", '{"instruction": null, "output": "b"}\n')
    message = data_error_of(validate_records, load_records(path))
    assert message.endswith("field 'instruction' is null (expected a string)")


def test_alpaca_input_of_wrong_type(tmp_path):
    path = write_file(tmp_path, "d.jsonl", '{"instruction": "a", "input": ["x"], "output": "b"}\n')
    message = data_error_of(validate_records, load_records(path), "alpaca")
    expected = "field 'input' is an array ['x'] (expected a string, possibly empty, or no field)"
    assert message == f"{path}:1: {expected}"


def test_instruction_format_refuses_a_set_input(tmp_path):
    path = write_file(tmp_path, "d.jsonl", '{"instruction": "a", "input": "ctx", "output": "b"}\n')
    message = data_error_of(validate_records, load_records(path), "instruction")
    assert message.startswith(f"{path}:1: field 'input' is set") and "use format 'alpaca'" in message


def test_chat_record_checks(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ends_with_user = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    bad_role = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    no_content = {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}
    alone = {"messages": [{"role": "assistant", "content": "y"}]}
    tool_call = {"messages": [{"role": "user", "content": "weather?"},
                              {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]},
                              {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C."}]}
    lines = [good, ends_with_user, bad_role, no_content, {"messages": "hi"}, alone, tool_call]
    for i, record in enumerate(lines):
        path = write_file(tmp_path, f"c{i}.jsonl", json.dumps(good) + "\n" + json.dumps(record) + "\n")
        records = load_records(path)
        if i == 0:
            assert validate_records(records) == "chat"
            continue
        message = data_error_of(validate_records, records, "chat")
        assert message.startswith(f"{path}:2: ")
        expected = [
            None,
            "the last message is the 'user' one; expected the conversation to end with an 'assistant'",
            "field 'messages[0].role' is a string 'robot' (expected one of 'system', 'user', 'assistant'",
            "field 'messages[0].content' is missing (expected a string)",
            "field 'messages' is a string 'hi' (expected a non-empty list of {role, content})",
            "field 'messages' holds only the assistant's reply; expected at least one system or user message",
            "field 'messages[1].tool_calls' is not supported (lorakit trains on each message's text content",
        ][i]
        assert expected in message


def test_mixed_formats_are_an_error(tmp_path):
    path = write_file(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n',
    )
    message = data_error_of(validate_records, load_records(path))
    assert message.startswith(f"{path}:2: record format 'chat' differs from 'instruction' (line 1)")


def test_unknown_record_format():
    assert "unknown record format 'qa'; expected one of instruction, alpaca, chat, sharegpt, text_label, preference" in data_error_of(
        validate_records, [{"instruction": "a", "output": "b"}], "qa"
    )


def test_text_label_is_a_hook_until_a_validator_is_registered(monkeypatch):
    records = [{"text": "good", "label": "pos", "_source": "s.csv", "_line": 2}]
    assert data_error_of(validate_records, records) == (
        "s.csv:2: text+label records are classification data; a run with task: seq_cls trains on them")

    monkeypatch.setattr(formats, "_VALIDATORS", dict(formats._VALIDATORS))  # undone after the test
    seen = []
    formats.register_validator("text_label", lambda record, at: seen.append(at))
    assert validate_records(records) == "text_label"
    assert seen == ["s.csv:2"]


def test_a_sharegpt_from_that_is_not_text_is_named(tmp_path):
    """Found by the property tests: a list as `from` was a TypeError (unhashable) instead of one line."""
    path = write_file(tmp_path, "d.jsonl", json.dumps(
        {"conversations": [{"from": [], "value": ""}, {"from": "gpt", "value": "0"}]}) + "\n")
    message = data_error_of(validate_records, load_records(path))
    assert message.startswith(f"{path}:1: field 'conversations[0].from' is ")
    assert "(expected one of " in message
