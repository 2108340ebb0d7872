"""Text/label data sets for sequence classification: read, check, tokenise, pad.

Labels may be ints or strings; the label set comes from the training records (numeric labels in
numeric order, others in sorted order), and an eval record whose label the training data never
showed is an error naming its row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.config import DataConfig
from lorakit.data.collate import pad_batch
from lorakit.data.dataset import read_field, read_test_records, with_eval_split
from lorakit.data.files import load_records
from lorakit.data.formats import DataError, json_type, where


@dataclass
class LabelSet:
    values: list[str]  # label values as they appear in the data (as strings), in id order
    names: list[str]  # display names, in id order

    def id_of(self, value: Any, at: str) -> int:
        key = _label_key(value)
        if key not in self._index:
            raise DataError(
                f"{at}: label {value!r} was not seen in the training data (known: {', '.join(self.values)})"
            )
        return self._index[key]

    def __post_init__(self) -> None:
        self._index = {v: i for i, v in enumerate(self.values)}


def _label_key(value: Any) -> str:
    return str(value).strip()


def check_text_label(records: list[dict], config: DataConfig, source: str | None) -> None:
    """Every record has a non-empty text (and pair) column and a label; one line per problem."""
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    for record in records:
        at = where(record, source)
        for column in columns:
            if column not in record:
                raise DataError(f"{at}: column '{column}' is missing (have: {', '.join(_public(record))})")
            if not isinstance(record[column], str) or not record[column].strip():
                raise DataError(f"{at}: column '{column}' is empty (expected text)")
        label = record.get(config.label_column)
        if isinstance(label, bool) or not isinstance(label, str | int):
            state = "missing" if config.label_column not in record else f"{json_type(label)}"
            raise DataError(f"{at}: column '{config.label_column}' is {state} (expected a label: a string or an integer)")
        if _label_key(label) == "":
            raise DataError(f"{at}: column '{config.label_column}' is empty (expected a label)")


def label_set(records: list[dict], config: DataConfig) -> LabelSet:
    keys = {_label_key(r[config.label_column]) for r in records}
    numeric = all(re.fullmatch(r"-?[0-9]+", k) for k in keys)  # ASCII digits only: int() reads them all
    values = sorted(keys, key=int) if numeric else sorted(keys)
    if numeric:
        _one_way(records, config.label_column)
    names = config.label_names or values
    if len(names) != len(values):
        raise DataError(f"data.label_names: {len(names)} names for {len(values)} labels ({', '.join(values)})")
    return LabelSet(values, list(names))


def _one_way(records: list[dict], column: str) -> None:
    """DataError naming the first record whose numeric label another record writes otherwise ('01' after 1)."""
    first: dict[int, tuple[str, dict]] = {}
    for record in records:
        key = _label_key(record[column])
        seen, earlier = first.setdefault(int(key), (key, record))
        if seen != key:
            raise DataError(f"{where(record)}: column '{column}' holds {key!r} where {where(earlier)} holds {seen!r}, "
                            "one number written two ways; expected each numeric label written one way")


def read_classification(config: DataConfig, seed: int) -> tuple[list[dict], list[dict], LabelSet]:
    """(train, eval, labels) records from the data section, checked."""
    if not config.train_file:
        raise DataError("data.train_file: not set; give a TSV/CSV/JSONL file with text and label columns")
    train = read_field(load_records, config, "train_file")
    check_text_label(train, config, config.train_file)
    labels = label_set(train, config)  # from the whole training file, before any hold-out or limit
    train, evaluation = with_eval_split(
        config, train, lambda records, source: check_text_label(records, config, source), seed
    )
    return train, evaluation, labels


def read_classification_test(config: DataConfig) -> list[dict]:
    """`data.test_file`'s text/label records, checked (none when it is unset)."""
    return read_test_records(config, None, lambda records, source: check_text_label(records, config, source))


def tokenize_classification(tokenizer, records: list[dict], config: DataConfig, labels: LabelSet) -> list[dict]:
    """input_ids/attention_mask (token_type_ids for pairs) truncated to max_length, and the label id."""
    if not records:  # no eval split (data.eval_size 0, or too few records): tokenizers refuse an empty batch
        return []
    texts = [r[config.text_column] for r in records]
    pairs = [r[config.text_pair_column] for r in records] if config.text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=config.max_length)
    out = []
    for i, record in enumerate(records):
        example = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        example["label"] = labels.id_of(record[config.label_column], where(record, config.train_file))
        out.append(example)
    return out


def count_truncated(tokenizer, records: list[dict], config: DataConfig) -> int:
    """How many of `records` tokenize_classification cuts at max_length."""
    if not records:
        return 0
    texts = [r[config.text_column] for r in records]
    pairs = [r[config.text_pair_column] for r in records] if config.text_pair_column else None
    return sum(len(ids) > config.max_length for ids in tokenizer(texts, pairs, verbose=False)["input_ids"])


def pad_classification_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch (not to max_length); labels as a (B,) tensor."""
    batch = pad_batch(examples, pad_token_id)
    if "token_type_ids" in examples[0]:
        width = batch["input_ids"].shape[1]
        batch["token_type_ids"] = torch.tensor([e["token_type_ids"] + [0] * (width - len(e["token_type_ids"])) for e in examples])
    batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


def _public(record: dict) -> list[str]:
    return [k for k in record if not k.startswith("_")]
