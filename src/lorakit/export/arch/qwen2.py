"""Qwen2 (Qwen2.5, Qwen2.5-Coder) as llama.cpp's `qwen2` architecture.

Same layout as Llama plus q/k/v biases; llama.cpp's qwen2 uses NeoX-style rotary (halves, as
transformers does), so no rows move.
"""

from __future__ import annotations

from typing import Any

import gguf
import torch

from lorakit.export.arch import Architecture, NamedTensors, register
from lorakit.export.arch.decoder import gguf_name, write_decoder_hparams


def tensors(state: dict[str, torch.Tensor], config: Any) -> NamedTensors:
    for key, tensor in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, _, param = key.rpartition(".")
        name = gguf_name(module, "." + param)
        if name is None:
            raise ValueError(f"tensor {key!r} has no place in llama.cpp's qwen2 layout")
        yield name, tensor


def lora_target(module: str, config: Any):
    name = gguf_name(module, ".weight")
    return (name, lambda t: t) if name else None


QWEN2 = register(
    Architecture(
        gguf_arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2],
        hf_classes=("Qwen2ForCausalLM",),
        write_hparams=write_decoder_hparams,
        tensors=tensors,
        lora_target=lora_target,
    )
)
