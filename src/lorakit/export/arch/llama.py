"""Llama family (Llama, Mistral, SmolLM2) as llama.cpp's `llama` architecture.

The one reshaping: transformers' rotary embedding rotates the two halves of each head against
each other (`rotate_half`), while llama.cpp's rotates adjacent pairs. So the output rows of q_proj
and k_proj are reordered within each head: rows (i, i + d/2) become rows (2i, 2i + 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf
import torch

from lorakit.export.arch import Architecture, NamedTensors, register
from lorakit.export.arch.decoder import gguf_name, head_dim, write_decoder_hparams


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (transformers) to adjacent pairs (llama.cpp).

    Works on a weight (out, in), a bias (out,) or a LoRA B (out, r) alike: only rows move.
    """
    rows = weight.shape[0]
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (heads, 2, d/2, ...)
    return halves.transpose(1, 2).reshape(weight.shape)  # (heads, d/2, 2, ...) -> pairs adjacent


def _row_transform(module: str, config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if module.endswith("self_attn.q_proj"):
        return lambda t: interleave_rotary_rows(t, config.num_attention_heads)
    if module.endswith("self_attn.k_proj"):
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return lambda t: interleave_rotary_rows(t, kv_heads)
    return lambda t: t


def write_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    write_decoder_hparams(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def tensors(state: dict[str, torch.Tensor], config: Any) -> NamedTensors:
    for key, tensor in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a tied head from token_embd when `output` is absent
        module, _, param = key.rpartition(".")
        name = gguf_name(module, "." + param)
        if name is None:
            raise ValueError(f"tensor {key!r} has no place in llama.cpp's {config.model_type} layout")
        yield name, _row_transform(module, config)(tensor)


def lora_target(module: str, config: Any):
    name = gguf_name(module, ".weight")
    return (name, _row_transform(module, config)) if name else None


LLAMA = register(
    Architecture(
        gguf_arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA],
        hf_classes=("LlamaForCausalLM", "MistralForCausalLM"),
        write_hparams=write_hparams,
        tensors=tensors,
        lora_target=lora_target,
    )
)
