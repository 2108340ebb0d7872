"""The data readers under property tests: each record format, the file layouts it can be written in,
a strategy for its valid records, and the library path a file takes (read, check, render, tokenise).

A new format plugs in with one line: `FORMATS.append(RecordFormat(...))` (or an entry in the list
below) naming its records strategy, its check and the layouts it fits; every property in
test_reader_properties.py then runs on it.
"""

from __future__ import annotations

import csv
import io
import json
import signal
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hypothesis import strategies as st

from conftest import CHAT_TEMPLATE, tiny_tokenizer
from lorakit.config import DataConfig
from lorakit.data.classification import check_text_label, label_set, tokenize_classification
from lorakit.data.e2e import read_e2e_records
from lorakit.data.files import load_records
from lorakit.data.formats import DataError, public_fields, validate_records
from lorakit.data.masking import tokenize_dataset

# Characters that have broken text readers elsewhere: BOM, NUL, bidi controls (RLO, RLM, LRE, PDF),
# JSON's line and paragraph separators, NEL, vertical tab, form feed, a combining mark, an emoji,
# and CR / LF inside a value.
ODD_CHARS = ["\ufeff", "\x00", "\u202e", "\u200f", "\u202a", "\u202c", "\u2028", "\u2029", "\x85", "\x0b", "\x0c",
             "\u0301", "\U0001f600", "\r", "\n", "\r\n", "\t", '"', "\\", ",", "{", "}", "[", "]"]
TEXT = st.text(
    alphabet=st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(ODD_CHARS)),
    min_size=0, max_size=40,
)
NON_BLANK = st.builds(lambda head, text: head + text, st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp")),
                      TEXT)
CASES: Counter[str] = Counter()  # generated files read, per reader; printed at the end of the session


@dataclass(frozen=True)
class RecordFormat:
    name: str
    records: st.SearchStrategy  # one valid record (public fields only)
    layouts: tuple[str, ...]  # file layouts that can hold it: jsonl, json, csv, tsv, e2e-csv
    columns: tuple[str, ...] = ()  # its fields, in column order for CSV/TSV
    flat: bool = True  # every field a string (or an int label): CSV/TSV can hold it

    def suffix(self, layout: str) -> str:
        return ".csv" if layout == "e2e-csv" else f".{layout}"


def _message(role: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({"role": st.just(role), "content": TEXT})


CHAT = st.builds(
    lambda turns, reply: {"messages": [*turns, reply]},
    st.lists(st.one_of(_message("system"), _message("user"), _message("assistant")), min_size=1, max_size=3),
    _message("assistant"),
)

FORMATS: list[RecordFormat] = [
    RecordFormat("instruction", st.fixed_dictionaries({"instruction": NON_BLANK, "output": TEXT}),
                 ("jsonl", "json", "csv", "tsv"), ("instruction", "output")),
    RecordFormat("alpaca", st.fixed_dictionaries({"instruction": NON_BLANK, "input": TEXT, "output": TEXT}),
                 ("jsonl", "json", "csv", "tsv"), ("instruction", "input", "output")),
    RecordFormat("chat", CHAT, ("jsonl", "json"), ("messages",), flat=False),
    RecordFormat("text_label", st.fixed_dictionaries(
        {"text": NON_BLANK, "label": st.one_of(st.integers(-3, 3), st.sampled_from(["pos", "neg", "neutral"]))}),
        ("jsonl", "json", "csv", "tsv"), ("text", "label")),
    RecordFormat("e2e", st.fixed_dictionaries({
        "mr": st.lists(st.tuples(st.sampled_from(["name", "eatType", "food", "near"]),
                                 st.text(st.characters(blacklist_characters="[],", blacklist_categories=("Cs", "Cc")),
                                         min_size=1, max_size=12).filter(str.strip)),
                       min_size=1, max_size=4).map(lambda slots: ", ".join(f"{k}[{v}]" for k, v in slots)),
        "ref": NON_BLANK}), ("e2e-csv",), ("mr", "ref")),
]
BY_NAME = {f.name: f for f in FORMATS}


# --------------------------------------------------------------------------- writing files
def write_records(records: list[dict], layout: str, columns: tuple[str, ...], *, line_end: str = "\n",
                  bom: bool = False, indent: int | None = None, ascii_only: bool = False) -> bytes:
    """Records as a file of the given layout, byte for byte."""
    if layout == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + line_end for r in records)
    elif layout == "json":
        text = json.dumps(records, ensure_ascii=ascii_only, indent=indent)
        text = text.replace("\n", line_end)  # outside strings: json escapes every line break inside one
    else:
        out = io.StringIO(newline="")
        writer = csv.writer(out, delimiter="\t" if layout == "tsv" else ",", lineterminator=line_end)
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in records])
        text = out.getvalue()
    return (("\ufeff" if bom else "") + text).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- reading them the library's way
@cache
def toy_tokenizer():
    """A byte-level BPE with a chat template: any text encodes, chat records render."""
    tokenizer = tiny_tokenizer(["### Instruction:\nsay red\n\n### Command:\nred red", "hello world"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def read_file(fmt: RecordFormat, path: Path, layout: str) -> list[dict]:
    """What `lorakit train` does with a data file up to the model: read, check, render, tokenise.

    Returns the records' public fields. Raises DataError (and nothing else) for bad input.
    """
    CASES[f"{fmt.name}/{layout}"] += 1
    with time_limit(20):
        if layout == "e2e-csv":
            records = read_e2e_records(path)
            validate_records(records, "instruction", str(path))
        else:
            records = load_records(path)
        tokenizer = toy_tokenizer()
        if fmt.name == "text_label":
            config = DataConfig(train_file=str(path))
            check_text_label(records, config, str(path))
            tokenize_classification(tokenizer, records, config, label_set(records, config))
        elif fmt.name != "e2e":
            validate_records(records, fmt.name, str(path))
            tokenize_dataset(tokenizer, records, "alpaca" if fmt.name == "alpaca" else "seed", max_length=64)
    return [public_fields(r) for r in records]


def expected_after_reading(fmt: RecordFormat, layout: str, records: list[dict]) -> list[dict]:
    """What reading `records` back gives: CSV/TSV hold strings only; the E2E reader renders the MR."""
    if layout == "e2e-csv":
        from lorakit.data.e2e import render_mr

        return [{"instruction": render_mr(r["mr"]), "output": " ".join(r["ref"].split()), "mr": r["mr"]}
                for r in records]
    if layout in ("csv", "tsv"):
        return [{k: str(v) for k, v in r.items()} for r in records]
    return records


def assert_one_line_naming(err: DataError, path: Path) -> None:
    """The property of a refusal: one line, starting with the file (and its line, where there is one)."""
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}:") or message.startswith(f"{path} "), message


class Hang(Exception):
    """A read took longer than its limit."""


@contextmanager
def time_limit(seconds: int):
    """Fail (with Hang) instead of hanging: SIGALRM after `seconds`."""

    def expired(signum, frame):
        raise Hang(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
