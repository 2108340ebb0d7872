"""The eval split decision for small files: automatic hold-out, none, or a refusal naming the file."""

from __future__ import annotations

import logging

import pytest

from lorakit.config import ConfigError, DataConfig, RunConfig
from lorakit.data.formats import DataError
from lorakit.data.holdout import AUTO_MIN_RECORDS, hold_out

RECORDS = [{"i": i} for i in range(30)]


def test_unset_holds_out_a_tenth_of_a_large_enough_file():
    split = hold_out(RECORDS, None, seed=0, source="t.jsonl")
    assert (len(split.train), len(split.eval), split.note) == (27, 3, None)
    assert sorted(r["i"] for r in split.train + split.eval) == list(range(30))
    at_minimum = hold_out(RECORDS[:AUTO_MIN_RECORDS], None, seed=0, source="t.jsonl")
    assert (len(at_minimum.train), len(at_minimum.eval)) == (AUTO_MIN_RECORDS - 1, 1)


@pytest.mark.parametrize("n", [1, 2, AUTO_MIN_RECORDS - 1])
def test_unset_on_a_small_file_trains_on_all_of_it_and_says_so_once(n, caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        split = hold_out(RECORDS[:n], None, seed=0, source="t.jsonl")
    assert (split.train, split.eval) == (RECORDS[:n], [])
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [split.note] and "\n" not in split.note
    assert split.note.startswith(f"t.jsonl: only {n} training record") and "without evaluation" in split.note


def test_zero_trains_on_everything_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        split = hold_out(RECORDS[:1], 0, seed=0, source="t.jsonl")
    assert (split.train, split.eval) == (RECORDS[:1], []) and not caplog.records


@pytest.mark.parametrize(
    ("n", "size", "message"),
    [
        (1, 0.1, "t.jsonl: data.eval_size 0.1 holds out 1 of its 1 record and leaves none to train on"),
        (3, 3, "t.jsonl: data.eval_size 3 holds out 3 of its 3 records and leaves none to train on"),
        (3, 0.9, "t.jsonl: data.eval_size 0.9 holds out 3 of its 3 records"),
    ],
)
def test_an_explicit_size_the_file_cannot_give_is_refused_in_one_line(n, size, message):
    with pytest.raises(DataError) as err:
        hold_out(RECORDS[:n], size, seed=0, source="t.jsonl")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "0 to train on all of them without evaluation, or a separate data.eval_file" in str(err.value)


@pytest.mark.parametrize("size", [-1, 2.5, float("nan"), float("inf")])
def test_eval_size_out_of_range_is_a_config_problem(size):
    with pytest.raises(ConfigError, match=r"data.eval_size: given .*, expected 0 \(no eval split\)"):
        RunConfig(data=DataConfig(train_file="t.jsonl", eval_size=size))


@pytest.mark.parametrize("name", ["max_train_examples", "max_eval_examples"])
def test_example_limits_must_be_positive(name):
    with pytest.raises(ConfigError, match=rf"data.{name}: given -1, expected a positive integer or null"):
        RunConfig(data=DataConfig(train_file="t.jsonl", **{name: -1}))


def test_e2e_data_holds_out_whole_meaning_representations():
    """The E2E training CSV holds several references per MR: a per-record hold-out scored the checkpoint on MRs it
    trained on (all of them, on part 1); whole MRs are held out instead, a tenth of them."""
    from pathlib import Path

    from lorakit.data.dataset import read_records

    part = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e" / "original" / "trainset.part1of3.csv"
    train, evaluation, _ = read_records(DataConfig(train_file=str(part), format="e2e"), seed=0)
    train_mrs, eval_mrs = {r["mr"] for r in train}, {r["mr"] for r in evaluation}
    assert eval_mrs and not train_mrs & eval_mrs
    assert len(eval_mrs) == round(0.1 * len(train_mrs | eval_mrs))
    again, _, _ = read_records(DataConfig(train_file=str(part), format="e2e"), seed=0)
    assert again == train  # seeded: the same split every time


def test_a_grouped_hold_out_counts_groups_and_refuses_one_that_leaves_none():
    records = [{"mr": f"m{k}", "ref": j} for k in range(50) for j in range(8)]
    split = hold_out(records, 5, seed=0, source="e2e.csv", group_by="mr")  # five MRs, their 40 records
    assert len({r["mr"] for r in split.eval}) == 5 and len(split.eval) == 40 and len(split.train) == 360
    with pytest.raises(DataError, match="e2e.csv: data.eval_size 50 holds out 50 of its 50 MRs and leaves none"):
        hold_out(records, 50, seed=0, source="e2e.csv", group_by="mr")
