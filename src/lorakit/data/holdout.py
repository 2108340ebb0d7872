"""The eval split of a run without `data.eval_file`: how much of the training file is held out, if any.

`data.eval_size` decides:

* unset (the default): 10% of the records (at least one) when the file has at least
  `AUTO_MIN_RECORDS` of them; a smaller file trains on all of its records without evaluation,
  and a warning says so in one line (a hold-out of one or two records would choose checkpoints
  by noise and take away a large share of the training data);
* 0: train on every record without evaluation (no eval loss, the last step's adapter is kept);
* a share in (0, 1) or a count >= 1: hold out that many; a file too small for it (no training
  record would be left) is refused with one line, since evaluation was asked for explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lorakit.data.formats import DataError
from lorakit.data.split import train_test_split

log = logging.getLogger(__name__)

AUTO_EVAL_SHARE = 0.1
AUTO_MIN_RECORDS = 10


@dataclass
class Holdout:
    train: list
    eval: list
    note: str | None = None  # why there is no eval split, when there is none


def hold_out(records: list, eval_size: float | None, seed: int, source: str, group_by: str | None = None) -> Holdout:
    """Split `records` (from `source`, for messages) into train and eval as `data.eval_size` says.

    With `group_by` (a record field: the E2E meaning representation, `mr`) whole groups are held out, so no
    group has records on both sides, and eval_size counts groups: an MR's references all train or all evaluate.

    Raises:
        DataError: an explicit eval_size that would leave no training record.
    """
    n = len(records)
    if eval_size is None:
        if n < AUTO_MIN_RECORDS:
            note = (f"{source}: only {n} training record{'s' if n != 1 else ''}, too few to hold out an eval split "
                    f"(data.eval_size unset needs at least {AUTO_MIN_RECORDS}); training on all of them without "
                    "evaluation (set data.eval_size or data.eval_file to evaluate, or data.eval_size 0 to silence this)")
            log.warning(note)
            return Holdout(list(records), [], note)
        eval_size = AUTO_EVAL_SHARE
    if eval_size == 0:
        note = f"data.eval_size 0: training on all {n} records of {source} without evaluation"
        log.info(note)
        return Holdout(list(records), [], note)
    units = list(dict.fromkeys(r.get(group_by) for r in records)) if group_by is not None else list(range(n))
    kind = "MR" if group_by == "mr" else "group" if group_by is not None else "record"
    count = eval_count(eval_size, len(units))
    if count >= len(units):
        raise DataError(
            f"{source}: data.eval_size {eval_size:g} holds out {count} of its {len(units)} {kind}"
            f"{'s' if len(units) != 1 else ''} and leaves none to train on; expected a smaller data.eval_size, 0 to "
            "train on all of them without evaluation, or a separate data.eval_file"
        )
    if group_by is None:
        train, evaluation = train_test_split(records, count, seed)
        return Holdout(train, evaluation)
    held = set(train_test_split(units, count, seed)[1])  # whole groups: every record of a held-out one evaluates
    return Holdout([r for r in records if r.get(group_by) not in held], [r for r in records if r.get(group_by) in held])


def eval_count(eval_size: float, n: int) -> int:
    """Records held out of `n` for a share in (0, 1) (rounded, at least one) or a count >= 1."""
    if eval_size < 1:
        return max(1, round(n * eval_size))
    return int(eval_size)
