"""Typed configuration. Each field carries its help text; problems are collected and reported together."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field and what is allowed."""


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


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
    init_lora_weights: bool | str = _help(
        "True (Kaiming A, zero B), 'gaussian', 'pissa' (A, B from the top-r SVD of W), False (random)",
        default=True,
    )
    rank_pattern: dict[str, int] = _help("per-module rank overrides: {name pattern: r}", default_factory=dict)
    alpha_pattern: dict[str, float] = _help(
        "per-module alpha overrides: {name pattern: alpha}", default_factory=dict
    )
    task_type: str | None = _help("CAUSAL_LM or SEQ_CLS; SEQ_CLS saves the head by default", default=None)
    base_model_name_or_path: str | None = _help("the base this adapter belongs to", default=None)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def problems(self) -> list[str]:
        """Every invalid field, each as 'lora.<field>: given X, expected Y'."""
        out = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            out.append(f"lora.r: given {self.r!r}, expected a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            out.append(f"lora.lora_alpha: given {self.lora_alpha!r}, expected a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora.lora_dropout: given {self.lora_dropout!r}, expected a number in [0, 1)")
        if self.bias not in BIAS_CHOICES:
            out.append(f"lora.bias: given {self.bias!r}, expected one of {', '.join(BIAS_CHOICES)}")
        if self.init_lora_weights not in (True, False, "gaussian", "pissa"):
            out.append(
                f"lora.init_lora_weights: given {self.init_lora_weights!r}, "
                "expected true, false, 'gaussian' or 'pissa'"
            )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            out.append(f"lora.task_type: given {self.task_type!r}, expected one of {', '.join(TASK_TYPES)}")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                out.append(f"lora.rank_pattern[{key!r}]: given {value!r}, expected a positive integer")
        return out

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after `rank_pattern` / `alpha_pattern` (PEFT's matching)."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: a pattern key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
