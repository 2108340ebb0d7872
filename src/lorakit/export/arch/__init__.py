"""The architectures GGUF export knows, one module each, behind one registry.

An architecture says three things about a transformers model: the llama.cpp architecture name,
the hyperparameters llama.cpp reads (`write_hparams`), and the model's tensors under llama.cpp's
names, reshaped the way llama.cpp expects (`tensors`). Everything else (tokenizer, tensor types,
the file itself) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from lorakit.export.errors import ExportError

NamedTensors = Iterator[tuple[str, torch.Tensor]]


class UnsupportedArchitectureError(ExportError):
    """A model whose architecture GGUF export does not cover; the message names the supported ones."""


@dataclass(frozen=True)
class Architecture:
    """How one family of transformers models maps onto a llama.cpp architecture.

    Attributes:
        gguf_arch: llama.cpp's architecture name (`general.architecture`), e.g. "llama".
        hf_classes: the transformers `architectures` entries this covers, e.g. "LlamaForCausalLM".
        write_hparams: writes the architecture's hyperparameter keys from the model config.
        tensors: yields (llama.cpp name, tensor) from the model's state dict and config.
        lora_target: maps a transformers module path (e.g. `model.layers.3.self_attn.q_proj`) to the
            llama.cpp tensor name and a function applying the same reshaping to a LoRA B matrix;
            None where llama.cpp has no place for it.
    """

    gguf_arch: str
    hf_classes: tuple[str, ...]
    write_hparams: Callable[[gguf.GGUFWriter, Any], None]
    tensors: Callable[[dict[str, torch.Tensor], Any], NamedTensors]
    lora_target: Callable[[str, Any], tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None]


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for name in arch.hf_classes:
        ARCHITECTURES[name] = arch
    return arch


def architecture_for(config: Any) -> Architecture:
    """The registered architecture of a transformers config.

    Raises:
        UnsupportedArchitectureError: none of the config's `architectures` is registered.
    """
    _load_builtin()
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    given = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedArchitectureError(
        f"GGUF export does not support {given}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def tensor_name(kind: gguf.MODEL_TENSOR, block: int | None = None, suffix: str = ".weight") -> str:
    """llama.cpp's name for a tensor kind, e.g. `blk.3.attn_q.weight`."""
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=block) if block is not None else name) + suffix


def _load_builtin() -> None:
    from lorakit.export.arch import gpt2, llama, qwen2  # noqa: F401  (each registers itself)
