"""One fine-tuning run from a RunConfig: load, inject, prepare data, train, evaluate, save."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from lorakit.atomic_files import write_atomically
from lorakit.checkpoint.run_card import RUN_CARD, read_run_card, write_run_card  # noqa: F401  (RUN_CARD, read_run_card: re-exported)
from lorakit.config import ConfigError, RunConfig, to_dict
from lorakit.data.classification import (
    count_truncated,
    read_classification,
    read_classification_test,
    tokenize_classification,
)
from lorakit.data.dataset import prepare_data, prepare_preference_data, require_train_data
from lorakit.infer.score import score_generations
from lorakit.checkpoint.peft_io import load_adapter
from lorakit.lora.adapters import disable_adapters, set_adapter
from lorakit.lora.inject import inject, trainable_counts, trainable_report
from lorakit.models import (
    default_device, load_causal_lm, load_sequence_classifier, load_tokenizer, stored_dtype,
)
from lorakit.quant.model import quantize_model, weight_bytes_report
from lorakit.checkpoint.run_folder import check_output_dir
from lorakit.track.runlog import RunLog
from lorakit.train.checkpoints import resume_settings, selection_settings
from lorakit.track.samples import paired_rows
from lorakit.train import distributed
from lorakit.train.final_score import (
    describe_splits,
    eval_printer,
    evaluate_test,
    final_score_line,
    selection_line,
)
from lorakit.train.half_base import half_base_in_use
from lorakit.allocator import release_free_memory
from lorakit.train.loop import ADAPTER, seed_everything, train
from lorakit.train.objectives import OBJECTIVES, CausalLMObjective, ClassificationObjective
from lorakit.train.preference import DPOObjective, ORPOObjective
from lorakit.train.reference import CACHE_NAME, REFERENCE_ADAPTER, Reference, fingerprint, precompute_reference

log = logging.getLogger(__name__)
# The second seed's rule of thumb: fine-tuning needs at least about 1e-5 training tokens per parameter.
TOKENS_PER_PARAM_RULE = 1e-5


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
    require_train_data(config.data)
    world = distributed.init_from_env(config.train.ddp_timeout)
    echo = echo if world.main else _silent
    out = Path(config.train.output_dir)
    run_log = RunLog(out, config.train.report_to, to_dict(config), enabled=world.main,  # trackers installed?
                     replace=config.train.overwrite_output_dir and not config.train.resume)
    check_output_dir(config.train)  # every rank: none goes on to load while another stops here
    if world.main:
        try:  # fail before loading anything when the run folder cannot be written (written once training begins)
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as err:
            raise ConfigError(f"train.output_dir: cannot write to {out} ({err.strerror}); expected a writable folder") from None
    seed_everything(config.train.seed)
    try:
        with run_log.running():  # status.json: running, then finished, interrupted or failed
            summary = RUNS[OBJECTIVES[config.task]](config, echo, run_log)
            if world.main:
                write_atomically(out / "summary.json", json.dumps(summary, indent=1))  # the dashboard reads it
            run_log.log_adapter(summary.get("adapter"))
    finally:
        distributed.shutdown()
    return summary


def _run_state(run: RunConfig) -> dict:
    """What every checkpoint of the run keeps of its config: the model, and the settings a resume must give alike."""
    config = to_dict(run)
    return {"model": run.model, "settings": resume_settings(config), "selection": selection_settings(config)}


def _silent(*args, **kwargs) -> None:
    """`echo` on every process but rank 0."""


def run_causal_lm(run: RunConfig, echo=print, run_log: RunLog | None = None) -> dict:
    """Instruction-tune a causal LM; score generations before and after when `eval.task` is set.

    Training and checkpoint selection see the eval split only; the final scores (generation scores
    of the base and the adapter, and the loss) are on the test split when `data.test_file` is set.
    """
    tokenizer = load_tokenizer(run.model)
    quantize_now = run.lora.init_lora_weights != "loftq"  # LoftQ quantises after inject, from full precision
    model = load_causal_lm(run.model, _load_dtype(run, quantize_now)).to(default_device())
    if quantize_now:
        quantize_model(model, run.quantization)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    stats = data.stats["train"]
    echo(
        f"data: {stats.examples} train / {_eval_count(data.eval)}{_test_count(data.test)} examples; "
        f"{stats.truncated} truncated, {stats.dropped} dropped at max_length {run.data.max_length}"
    )

    summary: dict = {"model": run.model}
    main = distributed.current_world().main  # generation scoring runs on rank 0 only
    final_records = data.test_records if run.data.test_file else data.eval_records
    if main and run.eval.task and run.eval.compare_base and final_records:  # printed with the final score
        summary["base"] = score_generations(model, tokenizer, final_records, data.template, run.eval,
                                           keep_rows=True)

    inject(model, run.lora)
    summary["weight_bytes"] = _quantize_after_inject(model, run, echo)
    echo(trainable_report(model))
    trainable, total = trainable_counts(model)
    echo(data_sufficiency(stats.prompt_tokens + stats.response_tokens, trainable, total))
    objective = CausalLMObjective(tokenizer.pad_token_id, run.data.pack_length if run.data.packing else None)
    run_log = run_log or RunLog(run.train.output_dir, enabled=main)
    result = train(model, data.train, data.eval, run.train, objective, _run_state(run),
                   on_eval=eval_printer(_above_progress_bar(echo), run.data), run_log=run_log)
    if main:
        write_run_card(result.adapter_dir, template=data.card_template, task=run.eval.task, model=run.model,
                       quantization=to_dict(run.quantization) if run.quantization.bits else None)
    summary.update(steps=result.steps, seconds=round(result.seconds, 1), adapter=result.adapter_dir,
                   eval=result.final_eval, best_checkpoint=result.best_checkpoint, lean_path=result.lean_path,
                   **result.peak_memory)
    summary.update(describe_splits(run.data, run.train, result.best_metric, result.best_checkpoint,
                                   has_eval=bool(data.eval)))
    echo(trained_line(result))
    if half_base_in_use(model):  # score the saved adapter as generate and serve run it: on the fp32 base
        echo("the base was kept in a half type for training (train.half_base); the final scores load the saved "
             "adapter onto the fp32 base")
        del model
        release_free_memory()  # the half model's and training's freed memory, before the fp32 base comes in
        model = load_causal_lm(run.model).to(default_device())
        load_adapter(model, result.adapter_dir)

    scores = _final_causal_lm_scores(run, model, tokenizer, data, objective, result, summary, echo, run_log)
    summary["final_score"]["scores"] = scores
    _echo_result(echo, summary)
    return summary


def _final_causal_lm_scores(run: RunConfig, model, tokenizer, data, objective, result, summary: dict,
                            echo, run_log: RunLog) -> dict:
    """The chosen checkpoint's final scores: loss and generation scores on the test split (scored once),
    or, without a test file, the chosen eval and generation scores on the eval split."""
    main = distributed.current_world().main
    if data.test:
        scores = evaluate_test(model, objective, data.test, run.train.batch_size)
    elif run.data.test_file:  # a test file the objective cannot score (instruction records in a dpo run)
        scores = {}
    else:  # nothing chose a checkpoint: the evaluation of the last step, the adapter the run saved
        scores = _final_eval(result, run.train.metric_for_best)
    prefix = "test_" if run.data.test_file else "eval_"
    generated = {}
    records = data.test_records if run.data.test_file else data.eval_records
    if main and run.eval.task and records:
        summary["adapter_scores"] = score_generations(model, tokenizer, records, data.template, run.eval,
                                                      keep_rows=True)
        base_rows = summary["base"].pop("rows") if "base" in summary else None
        run_log.log_samples(paired_rows(summary["adapter_scores"].pop("rows"), base_rows))
        generated = _prefixed(prefix, summary["adapter_scores"])
        scores.update(generated)
        for sample in summary["adapter_scores"]["samples"]:
            echo(f"  {sample['instruction']!r}\n    -> {sample['prediction']}\n    ref {sample['reference']}")
    if main:  # on the eval split only the generation scores are new; its loss is logged with the checkpoint
        base = _prefixed(prefix, summary.get("base") or {})
        _log_final_scores(run_log, prefix.rstrip("_"), base, scores if run.data.test_file else generated,
                          result.steps)
    return scores


def run_classification(run: RunConfig, echo=print, run_log: RunLog | None = None) -> dict:
    """LoRA plus a fully trained head on a text/label set; keep the best checkpoint by train.metric_for_best."""
    train_records, eval_records, labels = read_classification(run.data, run.train.seed)
    test_records = read_classification_test(run.data)
    tokenizer = load_tokenizer(run.model)
    model = load_sequence_classifier(run.model, len(labels.values)).to(default_device())
    model.config.id2label = dict(enumerate(labels.names))
    model.config.label2id = {n: i for i, n in enumerate(labels.names)}
    train_examples = tokenize_classification(tokenizer, train_records, run.data, labels)
    eval_examples = tokenize_classification(tokenizer, eval_records, run.data, labels)
    test_examples = tokenize_classification(tokenizer, test_records, run.data, labels)
    truncated = count_truncated(tokenizer, train_records, run.data)
    echo(f"data: {len(train_examples)} train / {_eval_count(eval_examples)}{_test_count(test_examples)} examples; "
         f"{truncated} truncated at max_length {run.data.max_length}; labels: {', '.join(labels.names)}")

    lora = run.lora if run.lora.task_type else replace(run.lora, task_type="SEQ_CLS")
    inject(model, lora)
    _quantize_after_inject(model, run, echo)
    echo(trainable_report(model))
    trainable, total = trainable_counts(model)
    echo(data_sufficiency(sum(len(e["input_ids"]) for e in train_examples), trainable, total))
    objective = ClassificationObjective(tokenizer.pad_token_id, len(labels.values))
    run_log = run_log or RunLog(run.train.output_dir, enabled=distributed.current_world().main)
    result = train(model, train_examples, eval_examples, run.train, objective, _run_state(run),
                   on_eval=eval_printer(_above_progress_bar(echo), run.data), run_log=run_log)
    if distributed.current_world().main:
        write_run_card(result.adapter_dir, task="seq_cls", model=run.model, labels=labels.names,
                       max_length=run.data.max_length,
                       quantization=to_dict(run.quantization) if run.quantization.bits else None)
    echo(trained_line(result))
    best = result.best_metric if result.best_metric is not None else result.final_eval.get("eval_accuracy")
    summary = {
        "model": run.model, "steps": result.steps, "seconds": round(result.seconds, 1), "adapter": result.adapter_dir,
        "best_metric": best, "eval": result.final_eval, "trainable_share": trainable / total,
        "best_checkpoint": result.best_checkpoint, "lean_path": result.lean_path, **result.peak_memory,
        **describe_splits(run.data, run.train, result.best_metric, result.best_checkpoint, has_eval=bool(eval_examples)),
    }
    if test_examples:  # the chosen checkpoint, once, on the test split: accuracy and macro-F1 of one evaluation
        scores = evaluate_test(model, objective, test_examples, run.train.batch_size)
        if distributed.current_world().main:
            _log_final_scores(run_log, "test", {}, scores, result.steps)
    else:
        scores = _final_eval(result, run.train.metric_for_best)
    summary["final_score"]["scores"] = scores
    _echo_result(echo, summary)
    return summary


def run_preference(run: RunConfig, echo=print, run_log: RunLog | None = None) -> dict:
    """DPO or ORPO on prompt/chosen/rejected pairs, from a new adapter or a trained one (train.init_adapter).

    Dropout is off, as in TRL's preference trainers: the policy and the reference must score the
    same sequence alike at the start. Generation scores (eval.task) are of the starting model and
    of the chosen checkpoint, on the test split when data.test_file is set.
    """
    tokenizer = load_tokenizer(run.model)
    quantize_now = run.lora.init_lora_weights != "loftq" or bool(run.train.init_adapter)
    model = load_causal_lm(run.model, _load_dtype(run, quantize_now)).to(default_device())
    if quantize_now:
        quantize_model(model, run.quantization)
    data = prepare_preference_data(run.data, tokenizer, run.train.seed)
    stats = data.stats["train"]
    echo(f"data: {stats.examples} train / {len(data.eval)} eval pairs{_test_count(data.test)}; "
         f"{stats.truncated} truncated, {stats.dropped} dropped at max_length {run.data.max_length}")
    objective_class = OBJECTIVES[run.task]
    reference = _start_adapter(model, run, objective_class.needs_reference)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    summary: dict = {"model": run.model}
    main = distributed.current_world().main
    if main and run.eval.task and run.eval.compare_base:
        records = data.test_records if run.data.test_file else data.eval_records
        start = contextlib.nullcontext() if run.train.init_adapter else disable_adapters(model)
        with start:
            summary["base"] = score_generations(model, tokenizer, records, data.template, run.eval, keep_rows=True)
        if run.train.init_adapter:
            summary["base_label"] = f"starting adapter ({run.train.init_adapter})"
    summary["weight_bytes"] = _quantize_after_inject(model, run, echo)
    echo(trainable_report(model))
    objective = objective_class(tokenizer.pad_token_id, run.preference, reference)
    if objective.needs_reference and run.train.precompute_reference:
        splits = {"train": data.train, "eval": data.eval, "test": data.test}
        key = fingerprint(run.model, to_dict(run.quantization), run.train.init_adapter and
                          Path(run.train.init_adapter) / "adapter_model.safetensors", examples=splits)
        precompute_reference(model, reference, objective, splits, run.train.batch_size,
                             Path(run.train.output_dir) / CACHE_NAME, key, write=main)
        objective.reference = Reference("precomputed")
    run_log = run_log or RunLog(run.train.output_dir, enabled=main)
    result = train(model, data.train, data.eval, run.train, objective, _run_state(run),
                   on_eval=eval_printer(_above_progress_bar(echo), run.data), run_log=run_log)
    if main:
        write_run_card(result.adapter_dir, template=data.card_template, task=run.eval.task, model=run.model,
                       quantization=to_dict(run.quantization) if run.quantization.bits else None)
    summary.update(steps=result.steps, seconds=round(result.seconds, 1), adapter=result.adapter_dir,
                   eval=result.final_eval, best_checkpoint=result.best_checkpoint, lean_path=result.lean_path,
                   **result.peak_memory)
    summary.update(describe_splits(run.data, run.train, result.best_metric, result.best_checkpoint,
                                   has_eval=bool(data.eval)))
    echo(trained_line(result))
    scores = _final_causal_lm_scores(run, model, tokenizer, data, objective, result, summary, echo, run_log)
    summary["final_score"]["scores"] = scores
    _echo_result(echo, summary)
    return summary


def _start_adapter(model, run: RunConfig, needs_reference: bool) -> Reference:
    """Add the adapter to train (new, or train.init_adapter's) and return how to run the reference."""
    if not run.train.init_adapter:
        inject(model, run.lora)
        return Reference("base")
    load_adapter(model, run.train.init_adapter, ADAPTER)
    if not needs_reference or run.train.precompute_reference:
        return Reference("policy")  # used before the first step only (precompute), or not at all (orpo)
    load_adapter(model, run.train.init_adapter, REFERENCE_ADAPTER)  # a frozen copy: a few MB, not a model
    set_adapter(model, ADAPTER)
    return Reference(REFERENCE_ADAPTER)


RUNS = {CausalLMObjective: run_causal_lm, ClassificationObjective: run_classification,  # per objective
        DPOObjective: run_preference, ORPOObjective: run_preference}


def _load_dtype(run: RunConfig, quantize_now: bool) -> torch.dtype:
    """fp32; or, for a base quantised right after loading (QLoRA), the type its weights are stored in: each
    linear is quantised from its fp32 copy and the rest goes to fp32 (the same model as an fp32 load), while a
    bf16 or fp16 checkpoint is never held whole in fp32."""
    return stored_dtype(run.model) if run.quantization.bits and quantize_now else torch.float32


def _quantize_after_inject(model, run: RunConfig, echo) -> dict | None:
    """QLoRA: quantise what is still full precision (everything, for LoftQ) and report the bytes."""
    if run.quantization.bits is None:
        return None
    quantize_model(model, run.quantization)
    report = weight_bytes_report(model)
    echo(report.line())
    return report.as_dict()


def _log_final_scores(run_log: RunLog, kind: str, base: dict, final: dict, steps: int) -> None:
    """Put the final scores (the base's at step 0, the chosen checkpoint's at the end) into metrics.jsonl and the trackers.

    Scores on the test split are logged as kind "test", so that curves and anything reading eval
    events never mix them with the split that chose the checkpoint.
    """
    for step, scores in ((0, base), (steps, final)):
        numbers = {k: v for k, v in scores.items() if isinstance(v, float)}
        if numbers:
            run_log.write(kind=kind, step=step, **numbers)
    run_log.plot()


def trained_line(result) -> str:
    """'trained N steps in S s (peak memory ...); adapter in FOLDER' for a TrainResult."""
    peak = ", ".join(f"{'GPU ' if key == 'peak_gpu_mb' else ''}{mb / 1024:.2f} GiB"
                     for key, mb in result.peak_memory.items())
    steps = f"{result.steps} step{'' if result.steps == 1 else 's'}"
    return (f"trained {steps} in {result.seconds:.0f} s" + (f" (peak memory {peak})" if peak else "")
            + f"; adapter in {result.adapter_dir}")


def _eval_count(evaluation: list) -> str:
    return f"{len(evaluation)} eval" if evaluation else "no eval"


def _test_count(test: list) -> str:
    return f" / {len(test)} test" if test else ""


def _prefixed(prefix: str, scores: dict) -> dict:
    return {prefix + k: v for k, v in scores.items() if isinstance(v, float)}


def _final_eval(result, metric: str) -> dict:
    """The eval metrics of the adapter the run leaves: those logged with the chosen checkpoint's step, or, where
    nothing chose one, with the last step (none when that step was not evaluated)."""
    chosen = result.best_checkpoint
    step = int(chosen.rsplit("-", 1)[-1]) if chosen else result.steps
    found = [e for e in result.history if e.get("kind") == "eval" and e.get("step") == step
             and (not chosen or metric in e)]
    return {k: v for k, v in found[-1].items() if k.startswith("eval_")} if found else {}


def _echo_result(echo, summary: dict) -> None:
    """The run's closing lines: which split chose the checkpoint, then the one final score and its split."""
    echo(selection_line(summary))
    base = summary.get("base")
    if base:
        echo(f"{summary.get('base_label', 'base model (no adapter)')}, same split: {_scores_line(base)}")
    echo(final_score_line(summary))


def _above_progress_bar(echo):
    """Lines printed while the progress bar runs go above it (tqdm.write), not through it."""
    if echo is not print:
        return echo
    from tqdm.auto import tqdm

    return tqdm.write


def _scores_line(scores: dict) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if isinstance(v, float))

