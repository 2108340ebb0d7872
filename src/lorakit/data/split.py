"""Split records into train and test sets, reproducibly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def train_test_split(records: Sequence[T], test_size: float | int, seed: int) -> tuple[list[T], list[T]]:
    """Pick a random test set; the same seed and records always give the same split.

    Both parts keep the records' original order.

    Args:
        records: the records to split.
        test_size: a fraction in [0, 1) of the records (rounded, at least 1 when above 0), or a
            count in [0, len(records)); 0 gives an empty test set.
        seed: the random seed.

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: ``test_size`` out of range, or a split that would leave no training record.
    """
    n = len(records)
    n_test = _test_count(test_size, n)
    picked = set(random.Random(seed).sample(range(n), n_test))
    train = [r for i, r in enumerate(records) if i not in picked]
    test = [r for i, r in enumerate(records) if i in picked]
    return train, test


def _test_count(test_size: float | int, n: int) -> int:
    if isinstance(test_size, bool) or not isinstance(test_size, int | float):
        raise ValueError(f"test_size must be a fraction in [0, 1) or a count, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 <= test_size < 1.0:
            raise ValueError(
                f"test_size {test_size!r} as a fraction must be in [0, 1); pass an int for a count"
            )
        n_test = 0 if test_size == 0 else max(1, round(n * test_size))
    else:
        n_test = test_size
    if n_test < 0 or (n_test > 0 and n_test >= n):
        raise ValueError(
            f"test_size {test_size!r} gives {n_test} test records out of {n}; "
            f"expected 0 to {max(n - 1, 0)} so that training keeps at least one"
        )
    return n_test
