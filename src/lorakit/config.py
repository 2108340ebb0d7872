"""Typed configuration. Each field carries its help text; problems are collected and reported together."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields

from lorakit.lora.inits import INITS
from lorakit.lora.variants import VARIANTS
from lorakit.lora.variants.dora import DoraAdapter
from lorakit.tasks import TASKS

BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field and what is allowed.

    `problems` holds each problem on its own (the message joins them with '; '), so that a reader
    of a config file can put each one's line in front of it.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        return cls("; ".join(problems), problems)


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    """A finite number above 0 (not a bool, not NaN: NaN <= 0 is False too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class LoraConfig:
    """Where LoRA goes and how it is shaped. Field names follow PEFT's `LoraConfig`."""

    r: int = _help("rank of the update B A", default=8)
    lora_alpha: float = _help("scale numerator: the update is multiplied by lora_alpha / r", default=16)
    lora_dropout: float = _help("dropout on the adapter's input, in [0, 1)", default=0.0)
    target_modules: list[str] | str | None = _help(
        "module name suffixes, a regex matched against full names, 'all-linear', or None for the "
        "architecture's defaults",
        default=None,
    )
    bias: str = _help("which biases train: none | all | lora_only", default="none")
    modules_to_save: list[str] | None = _help(
        "modules trained in full and saved with the adapter (e.g. a classifier head)", default=None
    )
    use_rslora: bool = _help("scale by lora_alpha / sqrt(r) instead of lora_alpha / r", default=False)
    use_dora: bool = _help(
        "DoRA: a trained magnitude per output feature times the direction of W + s B A (Linear and Conv1D)",
        default=False,
    )
    dora_dropout: str = _help(
        "DoRA with lora_dropout > 0: full (PEFT's and the paper's code: the magnitude term (c - 1) W x sees the "
        "dropped-out input too, a second matmul with W) or lowrank (torchtune's: dropout on s B A x only, one "
        "matmul with W, as without dropout); a training setting, the saved adapter is PEFT's DoRA either way",
        default="full",
    )
    init_lora_weights: bool | str = _help(
        "True (Kaiming A, zero B), 'gaussian', 'pissa' (A, B from the top-r SVD of W), 'olora' (A, B from the QR "
        "of W), 'loftq' (A, B from the quantisation error of a quantised base; needs quantization.bits), False (random)",
        default=True,
    )
    loftq_iter: int = _help("LoftQ: alternating quantise/SVD rounds; 1 keeps the plain quantised base", default=1)
    rank_pattern: dict[str, int] = _help("per-module rank overrides: {name pattern: r}", default_factory=dict)
    alpha_pattern: dict[str, float] = _help(
        "per-module alpha overrides: {name pattern: alpha}", default_factory=dict
    )
    task_type: str | None = _help("CAUSAL_LM or SEQ_CLS; SEQ_CLS saves the head by default", default=None)
    base_model_name_or_path: str | None = _help("the base this adapter belongs to", default=None)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError.of(problems)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def problems(self) -> list[str]:
        """Every invalid field, each as 'lora.<field>: given X, expected Y'."""
        out = []
        if not _positive_int(self.r):
            out.append(f"lora.r: given {self.r!r}, expected a positive integer")
        if not _positive_number(self.lora_alpha):
            out.append(f"lora.lora_alpha: given {self.lora_alpha!r}, expected a positive number")
        for flag in ("use_rslora", *VARIANTS):  # a string "false" is truthy: it would turn the option on
            if not isinstance(getattr(self, flag, False), bool):
                out.append(f"lora.{flag}: given {getattr(self, flag)!r}, expected true or false")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora.lora_dropout: given {self.lora_dropout!r}, expected a number in [0, 1)")
        if self.bias not in BIAS_CHOICES:
            out.append(f"lora.bias: given {self.bias!r}, expected one of {', '.join(BIAS_CHOICES)}")
        dora_modes = DoraAdapter.DROPOUT_MODES
        if self.dora_dropout not in dora_modes:
            out.append(f"lora.dora_dropout: given {self.dora_dropout!r}, expected one of {', '.join(dora_modes)}")
        named_inits = [k for k in INITS if isinstance(k, str)]
        if not isinstance(self.init_lora_weights, bool) and self.init_lora_weights not in named_inits:
            out.append(
                f"lora.init_lora_weights: given {self.init_lora_weights!r}, "
                f"expected true, false or one of {', '.join(repr(k) for k in named_inits)}"
            )
        if not _positive_int(self.loftq_iter):
            out.append(f"lora.loftq_iter: given {self.loftq_iter!r}, expected a positive integer")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            out.append(f"lora.task_type: given {self.task_type!r}, expected one of {', '.join(TASK_TYPES)}")
        out += _target_problems(self.target_modules)
        for name, good, expected in [("rank_pattern", _positive_int, "a positive integer"),
                                     ("alpha_pattern", _positive_number, "a positive number")]:
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                out.append(f"lora.{name}: given {pattern!r}, expected a mapping of module name patterns to values")
                continue
            out += [f"lora.{name}[{key!r}]: {why}" for key in pattern if (why := _regex_problem(key))]
            out += [f"lora.{name}[{key!r}]: given {value!r}, expected {expected}" for key, value in pattern.items()
                    if not good(value)]
        chosen = [flag for flag in VARIANTS if getattr(self, flag, False)]
        if len(chosen) > 1:
            out.append(f"lora.{chosen[0]} and lora.{chosen[1]} are both set; an adapter is one variant, pick one")
        return out

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after `rank_pattern` / `alpha_pattern` (PEFT's matching)."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _target_problems(target) -> list[str]:
    """target_modules: None, a regex (a string) or a list of name suffixes (strings)."""
    if target is None:
        return []
    if isinstance(target, str):
        why = _regex_problem(target)
        return [f"lora.target_modules: {why}"] if why else []
    if isinstance(target, (list, tuple, set)) and all(isinstance(t, str) for t in target):
        return []
    return [f"lora.target_modules: given {target!r}, expected a list of module names, a regex, 'all-linear' or null"]


def _regex_problem(pattern) -> str | None:
    """Why `pattern` is not a regex (the reason in words), or None."""
    if not isinstance(pattern, str):
        return f"given {pattern!r}, expected a string (a module name pattern)"
    try:
        re.compile(pattern)
    except re.error as err:
        return f"given {pattern!r}, not a regex ({err})"
    return None


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: a pattern key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    train_file: str | None = _help("JSONL, JSON, CSV or TSV file of training examples", default=None)
    eval_file: str | None = _help(
        "held-out examples that every number printed while training, the best checkpoint (train.metric_for_best) "
        "and keep-best use; if unset, data.eval_size of the training file is split off",
        default=None,
    )
    test_file: str | None = _help(
        "examples scored once, after training, with the checkpoint the eval split chose: the run's reported "
        "result (eval.task scores and the loss). No training decision sees them; must differ from train_file "
        "and eval_file. Unset: the final score is on the eval split, and the summary says so",
        default=None,
    )
    hf_dataset: str | None = _help("a Hugging Face `datasets` name to load instead of train_file", default=None)
    format: str | None = _help(
        "a name of lorakit.data.formats.FORMATS: instruction | alpaca | chat (messages) | sharegpt (conversations) "
        "| preference (prompt/chosen/rejected, for task dpo/orpo) | text_label | e2e (official E2E NLG CSVs; a glob "
        "joins the train parts); detected from the first record if unset",
        default=None,
    )
    template: str = _help("prompt template: seed, alpaca, chat (the tokenizer's own chat template), or a custom "
                          "string with {instruction}; chat and sharegpt records always use chat", default="seed")
    train_on: str = _help("conversations: which assistant turns carry labels (their content and end-of-turn "
                          "token): all_assistant | last_assistant", default="all_assistant")
    max_length: int = _help("longest sequence in tokens; longer examples are truncated and counted", default=256)
    eval_size: float | None = _help(
        "share (or count, if >= 1) of the training file held out when no eval_file; 0: train on all of it without "
        "evaluation; unset: 10% when the file has at least 10 records, else none (a warning says so); E2E data "
        "(format e2e) is held out by whole MRs, and the share or count is of its MRs",
        default=None,
    )
    text_column: str = _help("text column of a text/label set", default="text")
    text_pair_column: str | None = _help("second text column (sentence pairs)", default=None)
    label_column: str = _help("label column of a text/label set", default="label")
    label_names: list[str] | None = _help(
        "display names for the labels, in the order of their sorted values (e.g. [negative, positive])", default=None
    )
    packing: bool = _help("put several examples in one row (no padding); the loss is unchanged", default=False)
    pack_length: int = _help("longest packed row in tokens", default=512)
    max_train_examples: int | None = _help("use only the first N training examples (after shuffling)", default=None)
    max_eval_examples: int | None = _help("use only the first N eval examples", default=None)


@dataclass
class TrainConfig:
    """The training loop's knobs; names follow transformers' TrainingArguments where one exists."""

    output_dir: str = _help("run folder: adapter/, checkpoints/, metrics.jsonl, curves.png", default="runs/train")
    epochs: float = _help("passes over the training set (ignored when max_steps > 0)", default=1.0)
    max_steps: int = _help("optimizer steps; > 0 overrides epochs", default=0)
    max_minutes: float | None = _help(
        "time budget: stop after the first step past this many minutes of training, then evaluate and save "
        "(the schedule still spans epochs/max_steps, so size those to fit)",
        default=None,
    )
    batch_size: int = _help("examples per micro-batch and process (device), as in HF Trainer and PEFT", default=8)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    global_batch_size: int | None = _help(
        "examples per optimizer step over all processes; if set, grad_accum = this / (batch_size x processes), "
        "so the same config gives the same run on any process count",
        default=None,
    )
    lr: float = _help("peak learning rate", default=2e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norms)", default=0.0)
    warmup_ratio: float = _help("share of steps (1+ if above 0) warming up: step k of w at k/(w+1) of lr", default=0.0)
    scheduler: str = _help("cosine | linear | constant", default="cosine")
    max_grad_norm: float = _help("gradient clipping norm; 0 disables", default=1.0)
    optimizer: str = _help("adamw | adamw_8bit | paged_adamw_8bit", default="adamw")
    loraplus_lr_ratio: float = _help("LoRA+: every B (embeddings' too) learns this x faster; 1 disables", default=1.0)
    logging_steps: int = _help("log every N optimizer steps", default=10)
    eval_strategy: str = _help("steps | epoch | no (the eval split scored once, after the last step)", default="epoch")
    eval_steps: int = _help("evaluate every N steps when eval_strategy is steps", default=100)
    save_strategy: str = _help("no | steps | epoch", default="epoch")
    save_steps: int = _help("checkpoint every N steps when save_strategy is steps", default=100)
    save_total_limit: int | None = _help("keep at most N checkpoints (the best is always kept)", default=2)
    metric_for_best: str = _help("eval metric that picks the best checkpoint", default="eval_loss")
    greater_is_better: bool | None = _help("whether a larger metric is better; inferred from its name if unset", default=None)
    precision: str = _help("fp32 | bf16 | fp16 (bf16/fp16 on GPU; fp32 on CPU)", default="fp32")
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    fused: bool = _help("fused LoRA kernels (linear, SwiGLU MLP) and grouped attention without key/value copies:"
                        " same math, less memory", default=True)
    fuse_projections: bool = _help("with fused: q/k/v (and gate/up) as one GEMM over their packed frozen weights,"
                                   " the siblings' LoRA A's concatenated (same math, bigger GEMMs)", default=True)
    half_base: str = _help("with fused, on a CPU: the frozen base weights in a half type, LoRA weights and activations"
                           " in fp32: auto (time fp32/fp16/bf16 GEMMs first; half only where clearly faster, e.g. AMX)"
                           " | off (fp32: a run's numbers then do not depend on the CPU) | fp16 | bf16",
                           default="auto")
    group_by_length: bool = _help("batch examples of similar length together (less padding; shuffled in groups"
                                  " of 50 batches, as transformers' group_by_length)", default=False)
    max_tokens_per_forward: int = _help("run each micro-batch through the model in row groups of at most this many"
                                        " tokens (same gradient, less activation memory); 0: whole", default=0)
    release_memory: bool = _help("return freed activation memory to the OS at once (on glibc's malloc, "
                                 "LORAKIT_MALLOC=system): peak memory follows what training holds, but every step "
                                 "page-faults its memory anew (~0.55x speed)", default=False)
    seed: int = _help("seed for initialisation, shuffling and dropout", default=0)
    resume: bool = _help("continue from the latest checkpoint in output_dir", default=False)
    overwrite_output_dir: bool = _help("a fresh run may replace the finished run, adapter and checkpoints "
                                       "output_dir holds (removed when training begins); else it is refused", default=False)
    init_adapter: str | None = _help(
        "an adapter folder (lorakit or PEFT) to start from instead of a new adapter, e.g. the SFT adapter before "
        "DPO; its own shape (r, alpha, targets) replaces the lora section's",
        default=None,
    )
    precompute_reference: bool = _help(
        "dpo: compute the reference log-probabilities once before training and keep them with the data "
        "(reference_logps.json in output_dir), instead of one reference forward per step",
        default=False,
    )
    guard: bool = _help(
        "divergence guard: on a NaN/inf loss or gradient norm (or a loss spike) roll back to the last good state",
        default=True,
    )
    spike_factor: float = _help(
        "a step loss above this many times the mean of the last spike_window losses counts as divergence; "
        "0 disables (the default: near-zero fine-tuning losses make such ratios noisy)",
        default=0.0,
    )
    spike_window: int = _help("how many recent step losses the spike test averages", default=20)
    rollback_lr_factor: float = _help("after a rollback the learning rate is multiplied by this, in (0, 1]", default=0.1)
    rollback_lr_steps: int = _help("for this many steps after the step rolled back to", default=20)
    max_rollbacks: int = _help("stop the run when it diverges again after this many rollbacks in a row", default=3)
    ddp_timeout: float = _help("seconds a process waits for the others at a collective before the run stops", default=1800)
    fsdp: bool = _help("shard the frozen base across GPUs with FSDP (bases too large for one GPU; needs CUDA;"
                       " experimental: it failed at its second step on the one GPU it was tried on)", default=False)
    progress: bool = _help("show a progress bar", default=True)
    report_to: list[str] | str = _help(
        "experiment trackers besides metrics.jsonl (always written): tensorboard, mlflow, wandb (offline unless"
        " logged in), or a list of them; none for metrics.jsonl alone",
        default_factory=list,
    )


@dataclass
class EvalConfig:
    """What is measured after training, beside the loss."""

    task: str | None = _help(
        f"task scorer for generated outputs: {', '.join(TASKS)} (lorakit.tasks), or null (exact match)", default=None
    )
    max_new_tokens: int = _help("generation budget per example", default=64)
    batch_size: int = _help("prompts per generation batch", default=32)
    compare_base: bool = _help("also score the base model without the adapter", default=True)
    samples: int = _help("example generations to print", default=5)

    def __post_init__(self) -> None:
        problems = [f"eval.{name}: given {getattr(self, name)!r}, expected {allowed}" for name, low, allowed in [
            ("max_new_tokens", 1, "a positive integer"), ("batch_size", 1, "a positive integer"),
            ("samples", 0, "an integer >= 0")] if isinstance(getattr(self, name), int) and getattr(self, name) < low]
        if problems:
            raise ConfigError.of(problems)


@dataclass
class PreferenceConfig:
    """Preference tuning (task dpo or orpo) on prompt/chosen/rejected pairs."""

    beta: float = _help(
        "dpo: beta, how far the adapter may move from the reference (reward = beta x log-ratio to the reference); "
        "orpo: lambda, the weight of the odds-ratio term beside the NLL", default=0.1)
    loss_type: str = _help("dpo loss: sigmoid (the DPO paper's) or ipo (squared, on per-token log-ratios)",
                           default="sigmoid")
    rpo_alpha: float | None = _help(
        "dpo: add rpo_alpha x the chosen replies' mean token NLL (RPO); null for none", default=None)
    orpo_prompt_loss: bool = _help(
        "orpo: the NLL term covers the prompt tokens too, as ORPO's reference code and TRL do; false: the chosen "
        "reply only", default=True)


@dataclass
class QuantizationConfig:
    """QLoRA: the base's linear layers stored in 4 or 8 bits (bitsandbytes); the adapters train in fp32."""

    bits: int | None = _help("4 (NF4/FP4 Linear4bit), 8 (LLM.int8 Linear8bitLt), or null for a full-precision base", default=None)
    type: str = _help("4-bit data type: nf4 (QLoRA's normal float) or fp4", default="nf4")
    double_quant: bool = _help("4-bit: store the block scales in 8 bits too (~0.37 bits per weight less)", default=True)
    compute_dtype: str | None = _help(
        "dtype of the quantised matmuls: bf16 | fp16 | fp32; unset: bf16 on CUDA, fp32 on CPU (bf16 is slow there)",
        default=None,
    )

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError.of(problems)

    def problems(self) -> list[str]:
        """Every invalid field, each as 'quantization.<field>: given X, expected Y'."""
        allowed = {"bits": (None, 4, 8), "type": ("nf4", "fp4"), "compute_dtype": (None, "bf16", "fp16", "fp32")}
        out = []
        for name, choices in allowed.items():
            value = getattr(self, name)
            if value not in choices or isinstance(value, bool):
                shown = ", ".join(str(c) for c in choices if c is not None)
                out.append(f"quantization.{name}: given {value!r}, expected one of {shown}")
        return out


@dataclass
class RunConfig:
    """A whole run: model, adapter shape, data, loop, evaluation."""

    model: str = _help("built-in name (smollm2-135m-instruct, minilm-l6), folder, .gguf file or Hub id", default="smollm2-135m-instruct")
    task: str = _help("the objective (lorakit.train.objectives): causal_lm, seq_cls, dpo or orpo", default="causal_lm")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the examples"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig, metadata={"help": "QLoRA base"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig,
                                         metadata={"help": "preference tuning (task dpo or orpo)"})

    def __post_init__(self) -> None:
        from lorakit.config_checks import run_problems  # the checks read this module's sections

        problems = run_problems(self)
        if problems:
            raise ConfigError.of(problems)


def to_dict(config) -> dict:
    """A plain dict of a config, for saving beside checkpoints."""
    return dataclasses.asdict(config)
