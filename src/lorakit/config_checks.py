"""A run config's checks across its sections: allowed choices, positive sizes, and what the tasks, splits,
trackers and the guard cannot do together; every problem one line naming its key (lorakit/config.py's
RunConfig runs them when it is made)."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import TYPE_CHECKING

from lorakit.lora.inits import MOVES_BASE
from lorakit.tasks import TASKS

if TYPE_CHECKING:
    from lorakit.config import DataConfig, RunConfig, TrainConfig

CHOICES = {
    ("DataConfig", "train_on"): ("all_assistant", "last_assistant"),
    ("TrainConfig", "scheduler"): ("cosine", "linear", "constant"),
    ("TrainConfig", "optimizer"): ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    ("TrainConfig", "eval_strategy"): ("no", "steps", "epoch"),
    ("TrainConfig", "save_strategy"): ("no", "steps", "epoch"),
    ("TrainConfig", "precision"): ("fp32", "bf16", "fp16"),
    ("TrainConfig", "half_base"): ("auto", "off", "fp16", "bf16"),
    ("PreferenceConfig", "loss_type"): ("sigmoid", "ipo"),
    ("EvalConfig", "task"): (None, *TASKS),
}
POSITIVE = {
    "pack_length", "max_length", "batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps",
    "max_new_tokens", "spike_window",
}


def run_problems(run: RunConfig) -> list[str]:
    """Choice and range problems across the sections (types are checked when the YAML is read)."""
    from lorakit.data.formats import FORMATS  # the registries that import torch: read when validating
    from lorakit.train.objectives import OBJECTIVES

    choices = {**CHOICES, ("DataConfig", "format"): (None, *FORMATS)}
    out = []
    for section_name in ("data", "train", "eval", "preference"):
        section = getattr(run, section_name)
        for f in fields(section):
            value = getattr(section, f.name)
            allowed = choices.get((type(section).__name__, f.name))
            if allowed and value not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                out.append(f"{section_name}.{f.name}: given {value!r}, expected one of {shown}")
            if f.name in POSITIVE and (not isinstance(value, int) or value <= 0):
                out.append(f"{section_name}.{f.name}: given {value!r}, expected a positive integer")
    if run.task not in OBJECTIVES:
        out.append(f"task: given {run.task!r}, expected one of {', '.join(OBJECTIVES)}")
    if run.train.lr <= 0:
        out.append(f"train.lr: given {run.train.lr!r}, expected a positive number")
    if run.train.max_minutes is not None and run.train.max_minutes <= 0:
        out.append(f"train.max_minutes: given {run.train.max_minutes!r}, expected a positive number of minutes or null")
    if run.train.global_batch_size is not None and run.train.global_batch_size <= 0:
        out.append(f"train.global_batch_size: given {run.train.global_batch_size!r}, expected a positive integer")
    if run.train.fsdp and run.train.eval_strategy != "no":
        out.append("train.fsdp: evaluation under FSDP is not supported yet; set train.eval_strategy no")
    out += _loop_problems(run.train)
    if isinstance(run.train.seed, bool) or not isinstance(run.train.seed, int) or not 0 <= run.train.seed < 2**32:
        out.append(f"train.seed: given {run.train.seed!r}, expected an integer from 0 to {2**32 - 1}")
    if run.train.ddp_timeout <= 0:
        out.append(f"train.ddp_timeout: given {run.train.ddp_timeout!r}, expected a positive number of seconds")
    out += _split_problems(run)
    out += _size_problems(run.data)
    out += _packing_problems(run.data)
    out += _unused_data_settings(run)
    out += _template_problems(run)
    if run.lora.init_lora_weights == "loftq" and run.quantization.bits is None:
        out.append("lora.init_lora_weights: 'loftq' needs a quantised base; set quantization.bits to 4 or 8")
    if run.lora.init_lora_weights in MOVES_BASE and run.quantization.bits is not None:
        out.append(
            f"lora.init_lora_weights: {run.lora.init_lora_weights!r} moves part of W into the adapter, which needs a "
            "float base; unset quantization.bits, or use 'loftq' for a quantised one"
        )
    if not 0 <= run.train.warmup_ratio < 1:
        out.append(f"train.warmup_ratio: given {run.train.warmup_ratio!r}, expected a number in [0, 1)")
    out += _guard_problems(run.train)
    out += _tracker_problems(run.train)
    out += _preference_problems(run)
    return out


PREFERENCE_TASKS = ("dpo", "orpo")


def _preference_problems(run: RunConfig) -> list[str]:
    """What the preference objectives cannot do, each as one line naming the key."""
    pref, out = run.preference, []
    if not isinstance(pref.beta, int | float) or pref.beta <= 0:
        out.append(f"preference.beta: given {pref.beta!r}, expected a positive number")
    if pref.rpo_alpha is not None and pref.rpo_alpha < 0:
        out.append(f"preference.rpo_alpha: given {pref.rpo_alpha!r}, expected a number >= 0 or null")
    out += _unused_preference_settings(run)
    if run.task not in PREFERENCE_TASKS:
        if run.train.precompute_reference:
            out.append(f"train.precompute_reference: task {run.task} has no reference model; it applies to task dpo")
        return out
    if run.data.packing:
        out.append(f"data.packing: task {run.task} compares a chosen and a rejected sequence per row pair, which "
                   "packing would mix; set data.packing false")
    if run.train.max_tokens_per_forward:
        out.append(f"train.max_tokens_per_forward: task {run.task} keeps each chosen/rejected pair in one forward; "
                   "set it to 0")
    if run.task == "orpo" and run.train.precompute_reference:
        out.append("train.precompute_reference: orpo needs no reference model; set it false")
    if run.train.fsdp:
        out.append(f"train.fsdp: task {run.task} is not supported under FSDP yet; set train.fsdp false")
    return out


# the preference settings each task reads; a setting changed for a task that does not read it would be ignored
PREFERENCE_SETTINGS = {"beta": ("dpo", "orpo"), "loss_type": ("dpo",), "rpo_alpha": ("dpo",),
                       "orpo_prompt_loss": ("orpo",)}


def _unused_preference_settings(run: RunConfig) -> list[str]:
    defaults = type(run.preference)()
    return [f"preference.{name}: given {getattr(run.preference, name)!r}, which task {run.task} does not use; it "
            f"applies to task {' and '.join(tasks)} (leave it out)"
            for name, tasks in PREFERENCE_SETTINGS.items()
            if run.task not in tasks and getattr(run.preference, name) != getattr(defaults, name)]


# data settings only one kind of task reads; one changed for a task that does not read it would be ignored
CLASSIFICATION_DATA = ("text_column", "text_pair_column", "label_column", "label_names")
SEQUENCE_DATA = ("hf_dataset", "template", "train_on", "packing", "pack_length")


def _unused_data_settings(run: RunConfig) -> list[str]:
    classifies = run.task == "seq_cls"
    defaults = type(run.data)()
    where = "task seq_cls" if not classifies else "the text-generating tasks (causal_lm, dpo, orpo)"
    out = [f"data.{name}: given {getattr(run.data, name)!r}, which task {run.task} does not use; it applies to "
           f"{where} (leave it out)"
           for name in (SEQUENCE_DATA if classifies else CLASSIFICATION_DATA)
           if getattr(run.data, name) != getattr(defaults, name)]
    if classifies and run.data.format not in (None, "text_label"):
        out.append(f"data.format: given {run.data.format!r}; task seq_cls reads text/label records (text_label), "
                   "by data.text_column and data.label_column")
    return out


def _template_problems(run: RunConfig) -> list[str]:
    """data.template checked before the model loads (chat needs the tokenizer, and is checked with it)."""
    from lorakit.data.formats import DataError
    from lorakit.data.templates import get_template

    if run.task == "seq_cls" or run.data.template == "chat":
        return []
    try:
        get_template(run.data.template)
    except DataError as err:
        return [f"data.template: given {run.data.template!r}; {err}"]
    return []


def _split_problems(run: RunConfig) -> list[str]:
    """One source of training records, and data.test_file a split of its own: never the file that trains or
    chooses the checkpoint (an eval_file that is the train file is a warning: lorakit.data.dataset)."""
    data, out = run.data, []
    if data.hf_dataset and data.train_file:
        out.append(f"data.hf_dataset: given {data.hf_dataset!r} with data.train_file {data.train_file!r}; expected "
                   "one source of training records")
    if data.eval_file is not None and data.eval_size is not None:
        out.append(f"data.eval_size: given {data.eval_size!r} with data.eval_file; the eval split is that file "
                   "(eval_size sizes a hold-out of the training file)")
    if data.test_file is None:
        return out
    if not isinstance(data.test_file, str) or not data.test_file.strip():
        return [f"data.test_file: given {data.test_file!r}, expected a file path or null"]
    for name in ("train_file", "eval_file"):
        other = getattr(data, name)
        if isinstance(other, str) and same_path(other, data.test_file):
            out.append(f"data.test_file: given {data.test_file!r}, the same file as data.{name}; "
                       "expected a separate test split that no training decision sees")
    if run.train.fsdp:
        out.append("data.test_file: scoring under FSDP is not supported yet; score the adapter with `lorakit eval`")
    return out


def _packing_problems(data: DataConfig) -> list[str]:
    """A packed row holds whole examples: a row shorter than the longest example would not be a limit."""
    if data.packing and isinstance(data.pack_length, int) and isinstance(data.max_length, int) \
            and 0 < data.pack_length < data.max_length:
        return [f"data.pack_length: given {data.pack_length}, shorter than data.max_length {data.max_length}; "
                "a packed row holds whole examples, so expected at least max_length"]
    return []


def _size_problems(data: DataConfig) -> list[str]:
    out = []
    size = data.eval_size
    if size is not None and not (size == 0 or 0 < size < 1 or (size >= 1 and float(size).is_integer())):
        out.append(f"data.eval_size: given {size!r}, expected 0 (no eval split), a share in (0, 1), "
                   "a whole count of records, or null")
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(data, name)
        if value is not None and value <= 0:
            out.append(f"data.{name}: given {value!r}, expected a positive integer or null (all)")
    return out


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _tracker_problems(train: TrainConfig) -> list[str]:
    from lorakit.track import TRACKERS

    names = [train.report_to] if isinstance(train.report_to, str) else list(train.report_to)
    allowed = ("jsonl", "none", *TRACKERS)
    return [
        f"train.report_to: given {name!r}, expected {', '.join(allowed)} or a list of them"
        for name in names
        if name not in allowed
    ]


def _guard_problems(train: TrainConfig) -> list[str]:
    out = []
    if not 0 < train.rollback_lr_factor <= 1:
        out.append(f"train.rollback_lr_factor: given {train.rollback_lr_factor!r}, expected a number in (0, 1]")
    if train.spike_factor != 0 and train.spike_factor <= 1:
        out.append(f"train.spike_factor: given {train.spike_factor!r}, expected 0 (off) or a number above 1")
    for name in ("rollback_lr_steps", "max_rollbacks"):
        if getattr(train, name) < 0:
            out.append(f"train.{name}: given {getattr(train, name)!r}, expected an integer >= 0")
    return out


def _loop_problems(train: TrainConfig) -> list[str]:
    """The loop's sizes and factors: a negative one would train silently wrong (a negative LoRA+ ratio is a negative
    learning rate for B; epochs 0 or below quietly became one step)."""
    out = []
    if not train.max_steps > 0 and not train.epochs > 0:
        out.append(f"train.epochs: given {train.epochs!r}, expected a positive number of passes "
                   "(or train.max_steps > 0)")
    if train.max_steps < 0:
        out.append(f"train.max_steps: given {train.max_steps!r}, expected 0 (use epochs) or a positive number of steps")
    for name, allowed, expected in [
        ("weight_decay", lambda v: v >= 0, "a number >= 0"),
        ("max_grad_norm", lambda v: v >= 0, "0 (no clipping) or a positive number"),
        ("loraplus_lr_ratio", lambda v: v > 0, "a positive number (1: off)"),
        ("max_tokens_per_forward", lambda v: v >= 0, "0 (off) or a positive number of tokens"),
        ("save_total_limit", lambda v: v is None or v > 0, "a positive number of checkpoints, or null (all)"),
    ]:
        value = getattr(train, name)
        if not allowed(value):
            out.append(f"train.{name}: given {value!r}, expected {expected}")
    if not str(train.output_dir).strip():
        out.append("train.output_dir: given an empty path, expected the run folder")
    return out
