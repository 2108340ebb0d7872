"""lorakit: LoRA and QLoRA fine-tuning of Hugging Face transformer models, and serving of the adapters."""

from lorakit.allocator import reexec_on_chosen_allocator

reexec_on_chosen_allocator()  # first: `lorakit train` starts again on tcmalloc before anything allocates (allocator.py)

import lorakit.onednn_caches  # noqa: F401  (first: bounds oneDNN's caches before any GEMM can run)

from lorakit.checkpoint.peft_io import AdapterError, load_adapter, save_adapter
from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.adapters import delete_adapter, disable_adapters, set_adapter, use_adapter
from lorakit.lora.inject import inject, trainable_counts, trainable_report
from lorakit.lora.layer import LoraAdapter, LoraLayer
from lorakit.lora.merge import merge_adapters, merge_and_unload, unmerge_adapters
from lorakit.lora.weighted import add_weighted_adapter
import lorakit.quant  # noqa: F401  (registers the bitsandbytes backend with lorakit.lora.base)

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "LoraAdapter",
    "LoraConfig",
    "LoraLayer",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "trainable_counts",
    "trainable_report",
    "unmerge_adapters",
    "use_adapter",
]
