"""Adapter folders combined into one adapter folder (`lorakit merge-adapters`), written whole or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lorakit.models import portable_name
from lorakit.checkpoint.peft_io import AdapterError, load_adapter, read_adapter_config, read_adapter_weights, save_adapter
from lorakit.checkpoint.run_card import read_run_card, write_run_card
from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.weighted import add_weighted_adapter, option_problems, unused_options
from lorakit.models import load_causal_lm, load_sequence_classifier

COMBINED = "combined"


def combine_adapter_folders(
    folders: list[str | Path],
    weights: list[float],
    output: str | Path,
    combination_type: str = "cat",
    model_name: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
) -> LoraConfig:
    """Combine the adapters in `folders` with `weights` (lora.weighted.add_weighted_adapter) into `output`.

    The base is `model_name`, else the first adapter's `base_model_name_or_path`. `output` must be
    new or empty: the adapter is written beside it and moved into place in one step, so a failed
    run leaves nothing behind. DARE's masks come from a generator seeded with `seed`. The first
    adapter's run card (template, task, labels) is kept, with where the adapter came from.

    Raises:
        AdapterError: a folder cannot be read, or `output` holds something already.
        ConfigError: a weight, method or option is not allowed, or no base is known.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AdapterError(f"{output}: already exists and is not an empty folder; name a new one")
    if len(folders) != len(weights):
        raise ConfigError(f"--weights: {len(weights)} given for {len(folders)} adapters; give one weight per adapter")
    configs = [read_adapter_config(folder) for folder in folders]
    method = combination_type if len(folders) > 1 else "linear"  # one adapter: a scaled copy, as PEFT makes it
    problems = option_problems(method, configs, density, majority_sign_method, svd_rank, svd_clamp, weights)
    if len(folders) > 1:
        problems += unused_options(method, density, majority_sign_method, svd_rank, svd_clamp)
    problems += _folder_problems(folders, configs, model_name)
    if problems:  # before the base is loaded
        raise ConfigError.of(problems)
    model_name = model_name or configs[0].base_model_name_or_path
    if not model_name:
        raise ConfigError(f"{folders[0]}: names no base model (base_model_name_or_path); give it with --model")
    model = _base_for(model_name, configs[0], folders[0])
    names = [f"adapter{i}" for i in range(len(folders))]
    for name, folder in zip(names, folders):
        load_adapter(model, folder, name)
    config = add_weighted_adapter(
        model, names, weights, COMBINED, method, density=density, majority_sign_method=majority_sign_method,
        svd_rank=svd_rank, svd_clamp=svd_clamp, generator=torch.Generator().manual_seed(seed),
    )
    _write_whole(output, model, folders, weights, combination_type)
    return config


def _folder_problems(folders, configs: list[LoraConfig], model_name: str | None) -> list[str]:
    """Adapters that cannot be combined as given: trained biases (a combination merges LoRA factors only), or, unless
    --model names the base, adapters made for different bases."""
    problems = [f"{folder}: bias is {c.bias!r}; a combination merges LoRA factors only, not trained biases"
                for folder, c in zip(folders, configs) if c.bias != "none"]
    first = configs[0].base_model_name_or_path
    problems += [f"{folder}: made for {c.base_model_name_or_path}, the first adapter for {first}; adapters combine on "
                 "one base (give it with --model if these are the same model)"
                 for folder, c in zip(folders[1:], configs[1:])
                 if model_name is None and first and c.base_model_name_or_path
                 and portable_name(c.base_model_name_or_path) != portable_name(first)]  # a built-in by name or folder
    return problems


def _base_for(model_name: str, config: LoraConfig, folder):
    """The base the adapters sit on: a sequence classifier when the first adapter carries a head."""
    if config.task_type != "SEQ_CLS":
        return load_causal_lm(model_name)
    heads = [v for k, v in read_adapter_weights(folder).items() if k.endswith(("classifier.weight", "score.weight"))]
    return load_sequence_classifier(model_name, heads[0].shape[0] if heads else 2)


def _write_whole(output: Path, model, folders, weights, combination_type: str) -> None:
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_adapter(model, staging, COMBINED)
        card = {**read_run_card(folders[0]), "combined_from": [str(f) for f in folders], "weights": list(weights),
                "combination_type": combination_type}
        write_run_card(staging, **card)
        os.replace(staging, output)  # a new or empty folder is replaced in one step
    finally:
        shutil.rmtree(staging, ignore_errors=True)
