"""The data layer for instruction tuning: read records, render prompts, mask, pad, split.

Typical use::

    records = load_records("train.jsonl")
    record_format = validate_records(records)
    train, test = train_test_split(records, test_size=0.1, seed=0)
    examples, stats = tokenize_dataset(tokenizer, train, "alpaca", max_length=512)
    batch = pad_batch(examples[:8], pad_token_id=tokenizer.pad_token_id)
"""

from lorakit.data.collate import pad_batch
from lorakit.data.files import load_hf_dataset, load_records
from lorakit.data.formats import DataError, detect_format, register_validator, validate_records
from lorakit.data.masking import IGNORE_INDEX, TokenizeStats, tokenize_dataset, tokenize_example
from lorakit.data.split import train_test_split
from lorakit.data.templates import (
    ALPACA_NO_INPUT_TEMPLATE,
    ALPACA_TEMPLATE,
    SEED_TEMPLATE,
    ChatTemplate,
    PromptTemplate,
    get_template,
)

__all__ = [
    "ALPACA_NO_INPUT_TEMPLATE",
    "ALPACA_TEMPLATE",
    "IGNORE_INDEX",
    "SEED_TEMPLATE",
    "ChatTemplate",
    "DataError",
    "PromptTemplate",
    "TokenizeStats",
    "detect_format",
    "get_template",
    "load_hf_dataset",
    "load_records",
    "pad_batch",
    "register_validator",
    "tokenize_dataset",
    "tokenize_example",
    "train_test_split",
    "validate_records",
]
