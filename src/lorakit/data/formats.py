"""Check each record's fields against its format; the one-line DataError and ``file:line`` helpers.

Records read by ``lorakit.data.files`` keep where they came from under two private keys,
``_source`` (file name) and ``_line`` (1-based line number), so that any later error (a missing
template field, say) can name ``file:line``. Every problem raises a one-line :class:`DataError`
that names the file, the line and what was expected.

Record formats (``validate_records``):

* ``instruction``: ``instruction`` and ``output`` strings.
* ``alpaca``: ``instruction``, ``output`` and ``input`` (a string; may be empty, null or missing).
* ``chat``: ``messages``, a list of ``{"role", "content"}``; the last message is the assistant's.
* ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` (``human``/``gpt``/``system``...);
  the last turn is the assistant's (``gpt``).
* ``preference``: ``prompt``, ``chosen`` and ``rejected`` (task dpo/orpo), plain strings or chat
  messages; checked by ``lorakit.data.preference``.
* ``text_label``: classification; validated by a checker registered with
  :func:`register_validator` (the classification task provides it).

``FORMATS`` names every ``data.format`` a config may give: the record formats above, and data sets
with a file layout of their own, which bring a reader that turns their files into records of one
of the record formats (``e2e``: the official E2E NLG CSVs as ``instruction`` records).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SOURCE_KEY = "_source"
LINE_KEY = "_line"

# data.format name -> (the record format its records are, the reader of its files as "module:function";
# None: lorakit's JSONL/JSON/CSV/TSV reader, lorakit.data.files.load_records)
FORMATS: dict[str, tuple[str, str | None]] = {
    "instruction": ("instruction", None),
    "alpaca": ("alpaca", None),
    "chat": ("chat", None),
    "sharegpt": ("sharegpt", None),
    "text_label": ("text_label", None),
    "preference": ("preference", None),
    "e2e": ("instruction", "lorakit.data.e2e:read_e2e_records"),
}
RECORD_FORMATS = tuple(name for name, (records, _) in FORMATS.items() if records == name)
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


# --------------------------------------------------------------------------- checking records


def detect_format(record: dict[str, Any]) -> str:
    """Name the record format a record's fields fit.

    ``messages`` → ``chat``; ``conversations`` → ``sharegpt``; ``prompt`` + ``chosen`` +
    ``rejected`` → ``preference``; ``instruction`` + ``output`` → ``alpaca`` if an ``input`` field
    is present, else ``instruction``; ``text`` + ``label`` → ``text_label``.

    Raises:
        DataError: the fields fit no format.
    """
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= record.keys():
        return "preference"
    if "instruction" in record and "output" in record:
        return "alpaca" if "input" in record else "instruction"
    if "text" in record and "label" in record:
        return "text_label"
    fields = ", ".join(sorted(public_fields(record))) or "none"
    raise DataError(
        f"{where(record)}: cannot tell the record format from its fields ({fields}); expected "
        "instruction+output (instruction), instruction+input+output (alpaca), messages (chat), "
        "conversations (sharegpt), prompt+chosen+rejected (preference) or text+label (text_label)"
        + ("; an E2E challenge CSV (mr, ref) is read with data.format e2e (lorakit eval --format e2e)"
           if {"mr", "ref"} <= set(record) else "")
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
        if fmt == "text_label":  # registered by the classification task only
            first = records[0] if isinstance(records[0], dict) else {}
            raise DataError(f"{where(first, source)}: text+label records are classification data; "
                            "a run with task: seq_cls trains on them")
        raise DataError(
            f"record format {fmt!r} has no validator registered; register one with "
            "lorakit.data.formats.register_validator"
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
    _require_text(record, at)
    value = record.get("input")
    if isinstance(value, str) and value.strip():
        raise DataError(
            f"{at}: field 'input' is set but format 'instruction' has no place for it; use format 'alpaca'"
        )


def _check_alpaca(record: dict[str, Any], at: str) -> None:
    _require_text(record, at)
    if record.get("input") is not None:
        _require_str(record, "input", at, hint="a string, possibly empty, or no field")


# OpenAI-style tool calling: a message whose call lives outside 'content' would train as an empty reply
UNSUPPORTED_MESSAGE_KEYS = frozenset({"tool_calls", "function_call"})


def unsupported_keys(message: dict[str, Any]) -> list[str]:
    """The tool-calling keys a message sets; null or empty ones (OpenAI's SDK writes them on every message) set none."""
    return sorted(k for k in UNSUPPORTED_MESSAGE_KEYS.intersection(message) if message[k] not in (None, [], {}))


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
        for key in unsupported_keys(message):
            raise DataError(f"{at}: field '{field}.{key}' is not supported (lorakit trains on each message's text "
                            "content; write the call into 'content' or leave the turn out)")
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
    _require_reply(messages[-1]["content"], f"messages[{len(messages) - 1}].content", at)


def _check_sharegpt(record: dict[str, Any], at: str) -> None:
    from lorakit.data.chat import SHAREGPT_ROLES  # chat.py renders; the role names live there

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        expected = "a non-empty list of {from, value}"
        raise DataError(f"{at}: field 'conversations' is {_describe(turns)} (expected {expected})")
    roles = ", ".join(repr(r) for r in SHAREGPT_ROLES)
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: field '{field}' is {_describe(turn)} (expected a {{from, value}} object)")
        if not isinstance(turn.get("from"), str) or turn["from"] not in SHAREGPT_ROLES:
            state = "missing" if "from" not in turn else _describe(turn["from"])
            raise DataError(f"{at}: field '{field}.from' is {state} (expected one of {roles})")
        _require_str(turn, "value", at, field=f"{field}.value")
    if "system" in record:  # LLaMA-Factory's sharegpt column: the conversation's system prompt (empty: none)
        _require_str(record, "system", at)
        if record["system"] and SHAREGPT_ROLES[turns[0]["from"]] == "system":
            raise DataError(f"{at}: field 'system' is given and 'conversations' starts with a system turn too; "
                            "expected one system prompt")
    if SHAREGPT_ROLES[turns[-1]["from"]] != "assistant":
        raise DataError(
            f"{at}: the last turn is from {turns[-1]['from']!r}; "
            "expected the conversation to end with a 'gpt' (assistant) turn (the response to learn)"
        )
    if len(turns) < 2:
        raise DataError(
            f"{at}: field 'conversations' holds only the assistant's reply; "
            "expected at least one system or human turn before it (the prompt)"
        )
    _require_reply(turns[-1]["value"], f"conversations[{len(turns) - 1}].value", at)


def _require_reply(text: str, field: str, at: str) -> None:
    """The conversation's last reply, the one every example learns, holds text: an empty one would train the model
    to answer with nothing (as an instruction record's empty output)."""
    if not text.strip():
        raise DataError(f"{at}: field '{field}' is empty (expected the reply to learn)")


def _check_preference(record: dict[str, Any], at: str) -> None:
    from lorakit.data.preference import check_preference_record  # the pair format lives with its tokeniser

    check_preference_record(record, at)


def _require_text(record: dict[str, Any], at: str) -> None:
    """An instruction record's instruction and output: strings with text (an empty output would train the model to
    answer with nothing; an empty instruction, on the template alone)."""
    for key in ("instruction", "output"):
        _require_str(record, key, at)
        if not record[key].strip():
            raise DataError(f"{at}: field '{key}' is empty (expected text)")


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
    return f"{json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


_VALIDATORS: dict[str, Validator] = {
    "instruction": _check_instruction,
    "alpaca": _check_alpaca,
    "chat": _check_chat,
    "sharegpt": _check_sharegpt,
    "preference": _check_preference,
}
