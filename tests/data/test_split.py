"""Reproducible train/test split: split.py."""

import pytest

from lorakit.data.split import train_test_split

RECORDS = [{"id": i} for i in range(20)]


def test_same_seed_same_split_and_parts_cover_the_records():
    train, test = train_test_split(RECORDS, test_size=0.25, seed=3)
    assert (train, test) == train_test_split(RECORDS, test_size=0.25, seed=3)
    assert len(test) == 5 and len(train) == 15
    assert sorted(r["id"] for r in train + test) == list(range(20))
    assert [r["id"] for r in test] == sorted(r["id"] for r in test)  # original order kept


def test_different_seeds_give_different_splits():
    picks = {tuple(r["id"] for r in train_test_split(RECORDS, 0.25, seed)[1]) for seed in range(5)}
    assert len(picks) > 1


def test_count_and_small_fraction():
    assert len(train_test_split(RECORDS, test_size=3, seed=0)[1]) == 3
    assert len(train_test_split(RECORDS, test_size=0.01, seed=0)[1]) == 1  # rounds up to one record


def test_zero_gives_an_empty_test_set():
    assert train_test_split(RECORDS, test_size=0, seed=0) == (RECORDS, [])
    assert train_test_split(RECORDS, test_size=0.0, seed=0)[1] == []


@pytest.mark.parametrize(
    ("test_size", "message"),
    [
        (1.0, r"test_size 1.0 as a fraction must be in \[0, 1\)"),
        (20, "test_size 20 gives 20 test records out of 20; expected 0 to 19"),
        (-1, "test_size -1 gives -1 test records"),
        (True, "test_size must be a fraction in"),
        ("0.1", "test_size must be a fraction in"),
    ],
)
def test_bad_test_size(test_size, message):
    with pytest.raises(ValueError, match=message):
        train_test_split(RECORDS, test_size=test_size, seed=0)
