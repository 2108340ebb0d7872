"""One fine-tuning run from a RunConfig: load, inject, prepare data, train, evaluate, save."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from lorakit.config import RunConfig, to_dict
from lorakit.data.dataset import prepare_data
from lorakit.infer.score import score_generations
from lorakit.lora.inject import inject, trainable_counts, trainable_report
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.train.loop import seed_everything, train

log = logging.getLogger(__name__)
# The second seed's rule of thumb: fine-tuning needs at least about 1e-5 training tokens per parameter.
TOKENS_PER_PARAM_RULE = 1e-5
RUN_CARD = "lorakit.json"


def data_sufficiency(train_tokens: int, trainable: int, total: int) -> str:
    """One line comparing the training tokens with the parameter counts, warning when too few."""
    line = f"training tokens: {train_tokens:,d} | trainable params: {trainable:,d} | all params: {total:,d}"
    if train_tokens < TOKENS_PER_PARAM_RULE * total:
        line += f" | warning: fewer than {TOKENS_PER_PARAM_RULE:g} x params tokens; fine-tuning may do little"
    return line


def run_causal_lm(run: RunConfig, echo=print) -> dict:
    """Fine-tune a causal LM as `run` says; print progress through `echo`; return the summary."""
    out = Path(run.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(to_dict(run), sort_keys=False), encoding="utf-8")
    seed_everything(run.train.seed)
    tokenizer = load_tokenizer(run.model)
    model = load_causal_lm(run.model)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    stats = data.stats["train"]
    echo(
        f"data: {stats.examples} train / {len(data.eval)} eval examples; "
        f"{stats.truncated} truncated, {stats.dropped} dropped at max_length {run.data.max_length}"
    )

    summary: dict = {"model": run.model}
    if run.eval.task and run.eval.compare_base:
        summary["base"] = score_generations(model, tokenizer, data.eval_records, data.template, run.eval)
        echo(f"base model: {_scores_line(summary['base'])}")

    inject(model, run.lora)
    echo(trainable_report(model))
    trainable, total = trainable_counts(model)
    echo(data_sufficiency(stats.prompt_tokens + stats.response_tokens, trainable, total))
    result = train(model, data.train, data.eval, run.train, tokenizer.pad_token_id, {"model": run.model})
    write_run_card(result.adapter_dir, template=run.data.template, task=run.eval.task, model=run.model)
    summary.update(steps=result.steps, seconds=round(result.seconds, 1), adapter=result.adapter_dir,
                   eval=result.final_eval, best_checkpoint=result.best_checkpoint)
    echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.adapter_dir}")

    if run.eval.task:
        summary["adapter_scores"] = score_generations(model, tokenizer, data.eval_records, data.template, run.eval)
        echo(f"adapter: {_scores_line(summary['adapter_scores'])}")
        for sample in summary["adapter_scores"]["samples"]:
            echo(f"  {sample['instruction']!r}\n    -> {sample['prediction']}\n    ref {sample['reference']}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def write_run_card(adapter_dir: str | Path, **fields) -> None:
    """`lorakit.json` beside the PEFT files: how prompts were built, so generate/eval can do the same."""
    (Path(adapter_dir) / RUN_CARD).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")


def read_run_card(adapter_dir: str | Path | None) -> dict:
    path = Path(adapter_dir) / RUN_CARD if adapter_dir else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def _scores_line(scores: dict) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if isinstance(v, float))

