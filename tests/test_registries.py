"""Names live once: the config, the CLI and the help texts read the task, format, objective and variant registries."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lorakit.cli import build_parser
from lorakit.config import ConfigError, DataConfig, EvalConfig, RunConfig
from lorakit.data.formats import FORMATS
from lorakit.tasks import TASKS, task_scorer
from lorakit.train.objectives import OBJECTIVES


def _help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_a_config_choice_an_eval_choice_and_has_a_scorer(task):
    RunConfig(eval=EvalConfig(task=task))
    assert task in _help(EvalConfig, "task")
    assert callable(task_scorer(task))
    assert build_parser().parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--task", task]).task == task


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=f"eval.task: given 'nope', expected one of {', '.join(TASKS)}"):
        RunConfig(eval=EvalConfig(task="nope"))
    with pytest.raises(ConfigError, match=f"task: given 'nope', expected one of {', '.join(OBJECTIVES)}"):
        RunConfig(task="nope")
    with pytest.raises(ConfigError, match="data.format: given 'nope'"):
        RunConfig(data=DataConfig(format="nope"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_is_a_config_choice_and_documented(fmt):
    RunConfig(data=DataConfig(format=fmt))
    assert fmt in _help(DataConfig, "format")


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_is_a_config_choice_and_documented(objective):
    RunConfig(task=objective)
    assert objective in _help(RunConfig, "task")
