"""From a run's data section to tokenised train and eval examples."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from lorakit.config import DataConfig
from lorakit.config_checks import same_path
from lorakit.data.files import load_hf_dataset, load_records
from lorakit.data.formats import FORMATS, DataError, validate_records
from lorakit.data.masking import TokenizeStats, tokenize_dataset
from lorakit.data.holdout import hold_out
from lorakit.data.split import train_test_split
from lorakit.data.templates import get_template

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[dict[str, Any]]  # tokenised: input_ids, labels, attention_mask
    eval: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]  # the raw eval records, for generation-based scoring
    template: Any
    stats: dict[str, TokenizeStats] = field(default_factory=dict)
    test: list[dict[str, Any]] = field(default_factory=list)  # tokenised data.test_file: scored once, at the end
    test_records: list[dict[str, Any]] = field(default_factory=list)
    # the template an adapter trained on this data is prompted with (its run card): conversations always
    # render through the tokenizer's chat template, whatever data.template says
    card_template: str | None = None


def require_train_data(config: DataConfig) -> None:
    """Refuse a run with nothing to train on (an empty config, say), before anything is loaded."""
    if not (config.train_file or config.hf_dataset):
        raise DataError("data.train_file: not set; give a JSONL/JSON/CSV/TSV file (or data.hf_dataset)")


def read_records(config: DataConfig, seed: int) -> tuple[list[dict], list[dict], str]:
    """Raw (train, eval) records and their format, with the split and size limits applied."""
    load, fmt = file_reader(config.format)
    if config.hf_dataset:
        train = load_hf_dataset(config.hf_dataset, "train")
    else:
        require_train_data(config)
        train = read_field(load, config, "train_file")
    fmt = validate_records(train, fmt, config.train_file)

    def check(records: list[dict], source: str) -> None:
        validate_records(records, fmt, source)

    train, evaluation = with_eval_split(config, train, check, seed, load)
    return train, evaluation, fmt


def read_field(load, config: DataConfig, name: str) -> list[dict]:
    """`load` of the file that data.<name> gives; one that is not there names the field too."""
    try:
        return load(getattr(config, name))
    except FileNotFoundError as err:
        raise DataError(f"data.{name}: {err}") from None


def file_reader(fmt: str | None):
    """(reader, record format) for `data.format`: data sets with their own file layout bring a reader."""
    if fmt is None:
        return load_records, None
    records, reader = FORMATS[fmt]
    if reader is None:
        return load_records, records
    module, _, function = reader.partition(":")
    return getattr(importlib.import_module(module), function), records


def with_eval_split(config: DataConfig, train: list[dict], check, seed: int, load=load_records) -> tuple[list[dict], list[dict]]:
    """(train, eval): eval_file's records (checked with `check`) or a seeded hold-out; then the size limits.

    The eval list is empty when there is no eval split (data.eval_size 0, or a file too small for the
    automatic hold-out: see lorakit.data.holdout).
    """
    if config.eval_file:
        evaluation = read_field(load, config, "eval_file")
        check(evaluation, config.eval_file)
        if config.train_file and same_path(config.eval_file, config.train_file):
            log.warning("data.eval_file %s is data.train_file: the checkpoint is chosen, and without a test file "
                        "the final score given, on records the model trains on", config.eval_file)
    else:
        split = hold_out(train, config.eval_size, seed, str(config.train_file or config.hf_dataset),
                         group_by="mr" if config.format == "e2e" else None)  # an MR's references stay together
        train, evaluation = split.train, split.eval
    if config.max_train_examples and config.max_train_examples < len(train):
        train = train_test_split(train, config.max_train_examples, seed)[1]
    if config.max_eval_examples:
        evaluation = evaluation[: config.max_eval_examples]
    return train, evaluation


def read_test_records(config: DataConfig, fmt: str | None, check) -> list[dict]:
    """`data.test_file`'s records, checked with `check(records, source)` (none when it is unset)."""
    if not config.test_file:
        return []
    load, _ = file_reader(config.format)
    records = read_field(load, config, "test_file")
    check(records, config.test_file)
    return records


def prepare_data(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, split, render and tokenise a causal-LM run's examples (loss on the response only)."""
    train_records, eval_records, fmt = read_records(config, seed)
    if fmt == "preference":
        raise DataError(f"{config.train_file}: holds preference records (prompt, chosen, rejected), which train with "
                        "task dpo or orpo; set task, or give instruction or chat records")
    test_records = read_test_records(config, fmt, lambda records, source: validate_records(records, fmt, source))
    template = get_template(config.template, tokenizer, config.train_on)
    train, train_stats = tokenize_dataset(tokenizer, train_records, template, config.max_length, train_on=config.train_on)
    evaluation, eval_stats = tokenize_dataset(tokenizer, eval_records, template, config.max_length,
                                              train_on=config.train_on)
    if not train:
        raise DataError(f"{config.train_file}: no example kept a response token within max_length {config.max_length}")
    stats = {"train": train_stats, "eval": eval_stats}
    test: list[dict[str, Any]] = []
    if test_records:
        test, stats["test"] = tokenize_dataset(tokenizer, test_records, template, config.max_length,
                                               train_on=config.train_on)
    card_template = "chat" if fmt in ("chat", "sharegpt") else config.template  # both train through the chat template
    return PreparedData(train, evaluation, eval_records, template, stats, test, test_records, card_template)


def prepare_preference_data(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, split and tokenise a preference run's pairs (``lorakit.data.preference``).

    Train and eval hold preference records. The test file may hold preference records too (scored
    for loss and reward accuracy, and by generation from the prompt with the chosen reply as the
    reference) or instruction/chat records (scored by generation only). `eval_records` and
    `test_records` are what generation scoring reads.
    """
    from lorakit.data.preference import scoring_record, tokenize_preferences

    train_records, eval_records, fmt = read_records(config, seed)
    if fmt != "preference":
        raise DataError(f"{config.train_file or config.hf_dataset}: holds {fmt} records; task dpo and orpo train on "
                        "preference records with fields prompt, chosen and rejected")
    template = get_template(config.template, tokenizer, config.train_on)
    train, train_stats = tokenize_preferences(tokenizer, train_records, template, config.max_length)
    evaluation, _ = tokenize_preferences(tokenizer, eval_records, template, config.max_length)
    test_records = read_test_records(config, None, lambda records, source: None)
    test: list[dict[str, Any]] = []
    if test_records:
        test_format = validate_records(test_records, None, config.test_file)
        if test_format == "preference":
            test, _ = tokenize_preferences(tokenizer, test_records, template, config.max_length)
            test_records = [scoring_record(r) for r in test_records]
        elif test_format == "text_label":
            raise DataError(f"{config.test_file}: holds text_label records; expected preference, instruction or chat "
                            "records")
    stats = {"train": TokenizeStats(examples=train_stats.pairs, truncated=train_stats.truncated,
                                    dropped=train_stats.dropped)}
    chat_pairs = all(isinstance(r.get("prompt"), list) for r in train_records)
    return PreparedData(train, evaluation, [scoring_record(r) for r in eval_records], template, stats, test,
                        test_records, "chat" if chat_pairs else config.template)
