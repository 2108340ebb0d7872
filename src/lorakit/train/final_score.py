"""Which split chose the checkpoint, and the one score of that checkpoint on the test split.

A run has up to three splits: train (learned from), eval (`data.eval_file`, or a hold-out of the
training file: every number printed while training, the best checkpoint, keep-best) and test
(`data.test_file`: scored once, after training, with the checkpoint eval chose). Only the test
score is the run's result; without a test file the final score is on the eval split, and the
summary says that this is the split that chose the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lorakit.config import DataConfig, TrainConfig
from lorakit.train.distributed import shard


def selection_source(data: DataConfig, has_eval: bool = True) -> str:
    """Where the eval split comes from: its file, the hold-out of the training data, or nowhere."""
    if data.eval_file:
        return data.eval_file
    origin = data.train_file or data.hf_dataset
    if not has_eval:
        why = "data.eval_size 0" if data.eval_size == 0 else "too few records to hold out"
        return f"none ({why}: all of {origin} trained)"
    if data.eval_size is None:
        return f"held out of {origin} (data.eval_size unset: 10%)"
    size = f"{data.eval_size:g}" if data.eval_size < 1 else f"{int(data.eval_size)} records"
    return f"held out of {origin} (data.eval_size {size})"


def describe_splits(data: DataConfig, train: TrainConfig, best_metric: float | None,
                    best_checkpoint: str | None, has_eval: bool = True) -> dict:
    """The summary's `selection` and `final_score` entries (scores are added by the caller).

    Without an eval split (`has_eval` false) nothing chooses a checkpoint, and without a test file
    either there is no final score: its split is None.
    """
    chose = has_eval and train.eval_strategy != "no" and best_checkpoint is not None
    selection = {
        "split": "eval" if has_eval else None, "source": selection_source(data, has_eval),
        "metric": train.metric_for_best, "value": best_metric if chose else None,
        "checkpoint": best_checkpoint if chose else "the last step (no evaluation chose a checkpoint)",
    }
    if data.test_file:
        final = {"split": "test", "source": data.test_file}
    else:
        final = {"split": "eval" if has_eval else None, "source": selection["source"]}
    final["same_split_as_selection"] = not data.test_file and chose
    return {"selection": selection, "final_score": final}


def evaluate_test(model: nn.Module, objective, examples: list[dict], batch_size: int) -> dict:
    """The objective's metrics of `model` on the test examples, named test_* (every process calls it)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = objective.evaluate(model, shard(examples), batch_size, device)
    model.train(was_training)
    return {_test_name(k): v for k, v in result.items()}


def _test_name(key: str) -> str:
    return "test_" + key[len("eval_"):] if key.startswith("eval_") else key


def eval_printer(echo: Callable[[str], None], data: DataConfig) -> Callable[[int, dict], None]:
    """A `train(on_eval=...)` callback printing each evaluation as one line naming the eval split."""
    source = selection_source(data)

    def on_eval(step: int, result: dict) -> None:
        shown = ", ".join(_shown(k, v) for k, v in sorted(result.items()) if _is_number(v))  # as the final line
        echo(f"step {step} | eval split ({source}): {shown}")

    return on_eval


def selection_line(summary: dict) -> str:
    """'checkpoint chosen on ... by ...' for the printed run summary."""
    selection = summary["selection"]
    if selection["value"] is None:
        return f"checkpoint: {selection['checkpoint']}"
    return (f"checkpoint chosen on the eval split ({selection['source']}) by {selection['metric']} "
            f"{selection['value']:.4f}: {selection['checkpoint']}")


def final_score_line(summary: dict) -> str:
    """'final score on ...: ...' for the printed run summary: the run's result and the split it is on."""
    final = summary["final_score"]
    scores = ", ".join(_shown(k, v) for k, v in final.get("scores", {}).items() if _is_number(v))
    if final["split"] is None:
        return ("final score: none, no eval or test split scored the adapter "
                "(set data.test_file, data.eval_file or data.eval_size for one)")
    if final["split"] == "test":
        where = f"the test split ({final['source']}), scored once with that checkpoint"
    elif final["same_split_as_selection"]:
        where = (f"the eval split ({final['source']}), the split that chose the checkpoint "
                 "(set data.test_file for a score no training decision saw)")
    else:
        where = f"the eval split ({final['source']}), which chose nothing"
    return f"final score on {where}: {scores or 'no metrics'}"


def _shown(key: str, value: float) -> str:
    if isinstance(value, int):  # a count (the scored examples, n), not a score
        return f"{key} {value:,d}"
    percent = any(word in key for word in ("accuracy", "exact_match", "valid_rate", "f1"))
    return f"{key} {value:.1%}" if percent else f"{key} {value:.4f}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
