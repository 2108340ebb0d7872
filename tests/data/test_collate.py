"""Dynamic padding into tensors: collate.py."""

import pytest
import torch

from lorakit.data.collate import pad_batch, split_rows
from lorakit.data.masking import IGNORE_INDEX

PAD = 0
EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "attention_mask": [1, 1, 1], "truncated": False},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12], "truncated": True},
]


def test_right_padding_to_the_longest():
    batch = pad_batch(EXAMPLES, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_left_padding_for_generation_without_labels():
    prompts = [{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9, 10]}]
    batch = pad_batch(prompts, pad_token_id=PAD, padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[PAD, PAD, 5, 6], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_left_padding_pads_labels_with_ignore_index():
    batch = pad_batch(EXAMPLES, pad_token_id=PAD, padding_side="left")
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7]
    assert batch["input_ids"][0].tolist() == [PAD, PAD, 5, 6, 7]


def test_pad_to_multiple_of():
    batch = pad_batch(EXAMPLES, pad_token_id=PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    assert batch["labels"][1, 5:].tolist() == [IGNORE_INDEX] * 3


def test_padding_only_reaches_the_longest_in_this_batch():
    assert pad_batch(EXAMPLES[:1], pad_token_id=PAD)["input_ids"].shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding_side": "middle"}, "padding_side must be one of right, left, got 'middle'"),
        ({"pad_token_id": None}, "pad_token_id must be an int, got None; set tokenizer.pad_token"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive int or None, got 0"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        pad_batch(EXAMPLES, **{"pad_token_id": PAD, **kwargs})


def test_no_examples_and_mixed_labels():
    with pytest.raises(ValueError, match="no examples"):
        pad_batch([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="some examples have 'labels' and some do not"):
        pad_batch([EXAMPLES[0], {"input_ids": [1]}], pad_token_id=PAD)
    with pytest.raises(ValueError, match="an example has 2 labels for 3 input_ids"):
        pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_token_id=PAD)


def test_split_rows_bounds_tokens_and_keeps_every_row():
    batch = {"input_ids": torch.arange(40).view(5, 8), "labels": torch.arange(40).view(5, 8), "real_tokens": torch.tensor(33)}
    pieces = split_rows(batch, 17)  # two rows of 8 per piece
    assert [p["input_ids"].shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), batch["input_ids"])
    assert all("real_tokens" not in p for p in pieces)
    assert split_rows(batch, 0) == [batch] and split_rows(batch, 1000) == [batch]
    assert len(split_rows(batch, 3)) == 5  # a row longer than the bound is a piece of its own
