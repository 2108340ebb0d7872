"""One fine-tuning run from a RunConfig: load, inject, prepare data, train, evaluate, save."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import yaml

from lorakit.config import ConfigError, RunConfig, to_dict
from lorakit.data.classification import read_classification, tokenize_classification
from lorakit.data.dataset import prepare_data
from lorakit.infer.score import score_generations
from lorakit.lora.inject import inject, trainable_counts, trainable_report
from lorakit.models import default_device, load_causal_lm, load_sequence_classifier, load_tokenizer
from lorakit.quant.model import quantize_model, weight_bytes_report
from lorakit.track.runlog import RunLog
from lorakit.track.samples import paired_rows
from lorakit.train import distributed
from lorakit.train.loop import seed_everything, train
from lorakit.train.objectives import CausalLMObjective, ClassificationObjective

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


def run(config: RunConfig, echo=print) -> dict:
    """Fine-tune as `config` says (causal LM or classification); print through `echo`; return the summary.

    Under torchrun or accelerate launch every process runs this; rank 0 alone prints and writes.
    """
    world = distributed.init_from_env(config.train.ddp_timeout)
    echo = echo if world.main else _silent
    out = Path(config.train.output_dir)
    run_log = RunLog(out, config.train.report_to, to_dict(config), enabled=world.main)  # trackers installed?
    if world.main:
        try:  # fail before loading anything when the run folder cannot be written
            out.mkdir(parents=True, exist_ok=True)
            (out / "run_config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"train.output_dir: cannot write to {out} ({err.strerror}); expected a writable folder") from None
    seed_everything(config.train.seed)
    try:
        with run_log.running():  # status.json: running, then finished, interrupted or failed
            summary = (run_classification if config.task == "seq_cls" else run_causal_lm)(config, echo, run_log)
            if world.main:
                (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            run_log.log_adapter(summary.get("adapter"))
    finally:
        distributed.shutdown()
    return summary


def _silent(*args, **kwargs) -> None:
    """`echo` on every process but rank 0."""


def run_causal_lm(run: RunConfig, echo=print, run_log: RunLog | None = None) -> dict:
    """Instruction-tune a causal LM; score generations before and after when `eval.task` is set."""
    tokenizer = load_tokenizer(run.model)
    model = load_causal_lm(run.model).to(default_device())
    if run.lora.init_lora_weights != "loftq":  # LoftQ quantises after inject, from the full-precision weights
        quantize_model(model, run.quantization)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    stats = data.stats["train"]
    echo(
        f"data: {stats.examples} train / {len(data.eval)} eval examples; "
        f"{stats.truncated} truncated, {stats.dropped} dropped at max_length {run.data.max_length}"
    )

    summary: dict = {"model": run.model}
    main = distributed.current_world().main  # generation scoring runs on rank 0 only
    if main and run.eval.task and run.eval.compare_base:
        summary["base"] = score_generations(model, tokenizer, data.eval_records, data.template, run.eval, keep_rows=True)
        echo(f"base model: {_scores_line(summary['base'])}")

    inject(model, run.lora)
    summary["weight_bytes"] = _quantize_after_inject(model, run, echo)
    echo(trainable_report(model))
    trainable, total = trainable_counts(model)
    echo(data_sufficiency(stats.prompt_tokens + stats.response_tokens, trainable, total))
    objective = CausalLMObjective(tokenizer.pad_token_id, run.data.pack_length if run.data.packing else None)
    run_log = run_log or RunLog(run.train.output_dir, enabled=main)
    result = train(model, data.train, data.eval, run.train, objective, {"model": run.model}, run_log)
    if main:
        write_run_card(result.adapter_dir, template=run.data.template, task=run.eval.task, model=run.model,
                       quantization=to_dict(run.quantization) if run.quantization.bits else None)
    summary.update(steps=result.steps, seconds=round(result.seconds, 1), adapter=result.adapter_dir,
                   eval=result.final_eval, best_checkpoint=result.best_checkpoint)
    echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.adapter_dir}")

    if main and run.eval.task:
        summary["adapter_scores"] = score_generations(model, tokenizer, data.eval_records, data.template, run.eval,
                                                      keep_rows=True)
        echo(f"adapter: {_scores_line(summary['adapter_scores'])}")
        base_rows = summary["base"].pop("rows") if "base" in summary else None
        run_log.log_samples(paired_rows(summary["adapter_scores"].pop("rows"), base_rows))
        _log_task_scores(run_log, summary.get("base"), summary["adapter_scores"], result.steps)
        for sample in summary["adapter_scores"]["samples"]:
            echo(f"  {sample['instruction']!r}\n    -> {sample['prediction']}\n    ref {sample['reference']}")
    return summary


def run_classification(run: RunConfig, echo=print, run_log: RunLog | None = None) -> dict:
    """LoRA plus a fully trained head on a text/label set; keep the best checkpoint by dev accuracy."""
    train_records, eval_records, labels = read_classification(run.data, run.train.seed)
    tokenizer = load_tokenizer(run.model)
    model = load_sequence_classifier(run.model, len(labels.values)).to(default_device())
    model.config.id2label = dict(enumerate(labels.names))
    model.config.label2id = {n: i for i, n in enumerate(labels.names)}
    train_examples = tokenize_classification(tokenizer, train_records, run.data, labels)
    eval_examples = tokenize_classification(tokenizer, eval_records, run.data, labels)
    echo(f"data: {len(train_examples)} train / {len(eval_examples)} eval examples; labels: {', '.join(labels.names)}")

    lora = run.lora if run.lora.task_type else replace(run.lora, task_type="SEQ_CLS")
    inject(model, lora)
    _quantize_after_inject(model, run, echo)
    echo(trainable_report(model))
    trainable, total = trainable_counts(model)
    echo(data_sufficiency(sum(len(e["input_ids"]) for e in train_examples), trainable, total))
    objective = ClassificationObjective(tokenizer.pad_token_id, len(labels.values))
    result = train(model, train_examples, eval_examples, run.train, objective, {"model": run.model}, run_log)
    if distributed.current_world().main:
        write_run_card(
            result.adapter_dir, task="seq_cls", model=run.model, labels=labels.names, max_length=run.data.max_length
        )
    echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.adapter_dir}")
    best = result.best_metric if result.best_metric is not None else result.final_eval.get("eval_accuracy")
    echo(f"best {run.train.metric_for_best}: {best}")
    trainable_share = trainable / total
    return {
        "model": run.model, "steps": result.steps, "seconds": round(result.seconds, 1), "adapter": result.adapter_dir,
        "best_metric": best, "eval": result.final_eval, "trainable_share": trainable_share,
        "best_checkpoint": result.best_checkpoint,
    }


def _quantize_after_inject(model, run: RunConfig, echo) -> dict | None:
    """QLoRA: quantise what is still full precision (everything, for LoftQ) and report the bytes."""
    if run.quantization.bits is None:
        return None
    quantize_model(model, run.quantization)
    report = weight_bytes_report(model)
    echo(report.line())
    return report.as_dict()


def _log_task_scores(run_log: RunLog, base: dict | None, adapter: dict, steps: int) -> None:
    """Put the generation scores (base at step 0, adapter at the end) into metrics.jsonl, the trackers and the plot."""
    for step, scores in ((0, base), (steps, adapter)):
        if scores:
            run_log.write(kind="eval", step=step, **{f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)})
    run_log.plot()


def write_run_card(adapter_dir: str | Path, **fields) -> None:
    """`lorakit.json` beside the PEFT files: how prompts were built, so generate/eval can do the same."""
    (Path(adapter_dir) / RUN_CARD).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")


def read_run_card(adapter_dir: str | Path | None) -> dict:
    path = Path(adapter_dir) / RUN_CARD if adapter_dir else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def _scores_line(scores: dict) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if isinstance(v, float))

