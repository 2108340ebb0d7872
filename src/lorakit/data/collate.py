"""Pad a list of tokenised examples into a batch of tensors.

Padding is dynamic: to the longest example in the batch (rounded up to ``pad_to_multiple_of``).
``input_ids`` are padded with the pad id, ``labels`` with ``-100`` so pads never carry a label,
and ``attention_mask`` is 0 on pads. Right padding is for training; left padding is for batched
generation, where every prompt must end at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.data.masking import IGNORE_INDEX

PADDING_SIDES = ("right", "left")


def pad_batch(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples to one length and stack them.

    Use ``functools.partial(pad_batch, pad_token_id=tok.pad_token_id)`` as a DataLoader
    ``collate_fn``.

    Args:
        examples: dicts with ``input_ids`` and optionally ``labels`` and ``attention_mask``
            (lists of ints, as ``masking.tokenize_example`` returns); other keys are ignored.
            ``labels`` must be in all examples or in none (generation batches have none).
        pad_token_id: the id written into padded ``input_ids`` positions.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``attention_mask`` and, when given, ``labels``: int64 tensors of shape
        (B, T).

    Raises:
        ValueError: no examples, a bad option, or examples that disagree about ``labels``.
    """
    _check_options(examples, pad_token_id, padding_side, pad_to_multiple_of)
    has_labels = ["labels" in ex for ex in examples]
    if any(has_labels) and not all(has_labels):
        raise ValueError("some examples have 'labels' and some do not; expected all or none")
    length = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of  # ceil to a multiple

    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    if all(has_labels):
        batch["labels"] = []
    for ex in examples:
        ids = list(ex["input_ids"])
        n_pad = length - len(ids)
        mask = list(ex.get("attention_mask", [1] * len(ids)))
        batch["input_ids"].append(_pad(ids, pad_token_id, n_pad, padding_side))
        batch["attention_mask"].append(_pad(mask, 0, n_pad, padding_side))
        if "labels" in batch:
            if len(ex["labels"]) != len(ids):
                n_labels = len(ex["labels"])
                raise ValueError(f"an example has {n_labels} labels for {len(ids)} input_ids; expected equal")
            batch["labels"].append(_pad(list(ex["labels"]), IGNORE_INDEX, n_pad, padding_side))
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def _pad(values: list[int], fill: int, n_pad: int, side: str) -> list[int]:
    padding = [fill] * n_pad
    return values + padding if side == "right" else padding + values


def _check_options(
    examples: Sequence[dict[str, Any]], pad_token_id: int, padding_side: str, pad_to_multiple_of: int | None
) -> None:
    if not examples:
        raise ValueError("pad_batch got no examples; expected at least one")
    if pad_token_id is None or isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(
            f"pad_token_id must be an int, got {pad_token_id!r}; set tokenizer.pad_token "
            "(e.g. to its eos_token: labels are masked by position, so EOS stays labelled)"
        )
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got {padding_side!r}")
    multiple = pad_to_multiple_of
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")


def split_rows(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Cut a batch along its rows into pieces of at most `max_tokens` (rows x length) each.

    A row is never cut, so a row longer than `max_tokens` is a piece of its own; 0 keeps the
    batch whole. Per-row tensors are sliced; per-batch scalars (`real_tokens`) stay with the whole.
    """
    rows, width = batch["input_ids"].shape
    per_piece = max(1, max_tokens // width) if max_tokens > 0 else rows
    if per_piece >= rows:
        return [batch]
    return [
        {k: v[start : start + per_piece] for k, v in batch.items() if v.dim() > 0} for start in range(0, rows, per_piece)
    ]
