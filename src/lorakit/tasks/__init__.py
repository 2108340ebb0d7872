"""Tasks: data set generators and scorers, one module per task, named in `TASKS`.

A task module offers `score(predictions, references) -> dict` (marked `score.multi_reference =
True` when each prompt has several references). The config's `eval.task` choices and `lorakit
eval --task` read `TASKS`, so a new task is its module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# task name -> the module holding its scorer (imported only when the task is used)
TASKS = {
    "ros2": "lorakit.tasks.ros2",
    "e2e": "lorakit.tasks.e2e",
}


def task_scorer(task: str | None) -> Callable[[list[str], list], dict]:
    """The task's `score(preds, refs) -> dict`, or exact match alone when `task` is None.

    Raises:
        KeyError: `task` is not in TASKS.
    """
    if task is None:
        return exact_match_score
    if task not in TASKS:
        raise KeyError(f"no task '{task}'; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task]).score


def exact_match_score(preds: list[str], refs: list[str]) -> dict[str, float]:
    """The share of predictions equal to their reference (surrounding whitespace aside)."""
    return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)}
