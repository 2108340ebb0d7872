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
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hypothesis import strategies as st

from conftest import CHAT_TEMPLATE, tiny_tokenizer
from property_support import ODD_CHARS, time_limit
from lorakit.config import DataConfig
from lorakit.data.classification import check_text_label, label_set, tokenize_classification
from lorakit.data.e2e import read_e2e_records
from lorakit.data.files import load_records
from lorakit.data.formats import DataError, public_fields, validate_records
from lorakit.data.masking import tokenize_dataset
from lorakit.data.preference import tokenize_preferences
from lorakit.data.templates import get_template

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


CHAT = st.builds(  # a system or user turn first, a non-blank reply last: what a chat record must hold
    lambda first, turns, reply: {"messages": [first, *turns, {"role": "assistant", "content": reply}]},
    st.one_of(_message("system"), _message("user")),
    st.lists(st.one_of(_message("system"), _message("user"), _message("assistant")), max_size=2),
    NON_BLANK,
)

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = CHAT.map(lambda record: {"conversations": [
    {"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in record["messages"]]})
PREFERENCE = st.one_of(
    st.fixed_dictionaries({"prompt": NON_BLANK, "chosen": NON_BLANK, "rejected": NON_BLANK}),
    st.builds(lambda prompt, chosen, rejected: {"prompt": prompt, "chosen": chosen, "rejected": rejected},
              st.lists(_message("user"), min_size=1, max_size=2), NON_BLANK, NON_BLANK),
)

FORMATS: list[RecordFormat] = [
    RecordFormat("instruction", st.fixed_dictionaries({"instruction": NON_BLANK, "output": NON_BLANK}),
                 ("jsonl", "json", "csv", "tsv"), ("instruction", "output")),
    RecordFormat("alpaca", st.fixed_dictionaries({"instruction": NON_BLANK, "input": TEXT, "output": NON_BLANK}),
                 ("jsonl", "json", "csv", "tsv"), ("instruction", "input", "output")),
    RecordFormat("chat", CHAT, ("jsonl", "json"), ("messages",), flat=False),
    RecordFormat("sharegpt", SHAREGPT, ("jsonl", "json"), ("conversations",), flat=False),
    RecordFormat("preference", PREFERENCE, ("jsonl", "json"), ("prompt", "chosen", "rejected"), flat=False),
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
        text = "".join(_csv_row(row, "\t" if layout == "tsv" else ",") + line_end
                       for row in [list(columns), *([r[c] for c in columns] for r in records)])
    return (("\ufeff" if bom else "") + text).encode("utf-8", "surrogatepass")


def _csv_row(row: list, delimiter: str) -> str:
    """One CSV/TSV row without its line end. The csv writer quotes a field holding a character of its
    line terminator only, so it writes with CRLF (every CR or LF inside a field quoted) and that goes."""
    out = io.StringIO(newline="")
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerow(row)
    return out.getvalue().removesuffix("\r\n")


# --------------------------------------------------------------------------- reading them the library's way
@cache
def toy_tokenizer():
    """A byte-level BPE with a chat template: any text encodes, chat records render."""
    tokenizer = tiny_tokenizer(["### Instruction:\nsay red\n\n### Command:\nred red", "hello world"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def read_file(fmt: RecordFormat, path: Path, layout: str, *, tokenize: bool = True) -> list[dict]:
    """What `lorakit train` does with a data file up to the model: read, check, render and (unless
    `tokenize` is false) tokenise.

    Returns the records' public fields. Raises DataError (and nothing else) for bad input.
    """
    CASES[f"{fmt.name}/{layout}"] += 1
    with time_limit(60):  # a hang detector, not a speed test: the machine may be busy
        if layout == "e2e-csv":
            records = read_e2e_records(path)
            validate_records(records, "instruction", str(path))
        else:
            records = load_records(path)
        tokenizer = toy_tokenizer()
        if fmt.name == "text_label":
            config = DataConfig(train_file=str(path))
            check_text_label(records, config, str(path))
            labels = label_set(records, config)
            if tokenize:
                tokenize_classification(tokenizer, records, config, labels)
        elif fmt.name == "preference":
            validate_records(records, fmt.name, str(path))
            if tokenize:
                tokenize_preferences(tokenizer, records, get_template("seed"), max_length=4096)
        elif fmt.name != "e2e":
            validate_records(records, fmt.name, str(path))
            if tokenize:
                tokenize_dataset(tokenizer, records, "alpaca" if fmt.name == "alpaca" else "seed", max_length=4096)
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
