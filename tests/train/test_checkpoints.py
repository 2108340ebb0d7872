"""When evaluations and checkpoints fall due, and which way the best metric points."""

from __future__ import annotations

import pytest

from lorakit.config import TrainConfig
from lorakit.train.checkpoints import due, greater_is_better


@pytest.mark.parametrize(
    ("strategy", "step", "epoch_end", "out_of_time", "expected"),
    [
        ("steps", 30, False, False, True),  # every 10 steps
        ("steps", 31, True, False, False),  # the end of an epoch does not count under "steps"
        ("steps", 31, False, True, True),  # a time-budget stop evaluates and saves its last step
        ("epoch", 30, False, False, False),
        ("epoch", 31, True, False, True),
        ("no", 30, True, True, False),
    ],
)
def test_due_follows_the_strategy(strategy, step, epoch_end, out_of_time, expected):
    assert due(strategy, 10, step, epoch_end, out_of_time) is expected


@pytest.mark.parametrize(
    ("metric", "explicit", "expected"),
    [("eval_loss", None, False), ("eval_perplexity", None, False), ("eval_accuracy", None, True),
     ("eval_bleu", None, True), ("eval_loss", True, True), ("eval_accuracy", False, False)],
)
def test_greater_is_better_is_inferred_from_the_name_unless_set(metric, explicit, expected):
    assert greater_is_better(TrainConfig(metric_for_best=metric, greater_is_better=explicit)) is expected
