"""GPT-2 as llama.cpp's `gpt2` architecture.

transformers' GPT-2 uses `Conv1D` layers whose weights are stored (in, out); llama.cpp wants
(out, in) like every other linear layer, so those four are transposed. Position embeddings are a
tensor of their own (`position_embd`), and the head is tied to the token embedding.
"""

from __future__ import annotations

import re
from typing import Any

import gguf
import torch

from lorakit.export.arch import Architecture, NamedTensors, register, tensor_name

T = gguf.MODEL_TENSOR
LAYER_TENSORS = {
    "ln_1": T.ATTN_NORM,
    "attn.c_attn": T.ATTN_QKV,
    "attn.c_proj": T.ATTN_OUT,
    "ln_2": T.FFN_NORM,
    "mlp.c_fc": T.FFN_UP,
    "mlp.c_proj": T.FFN_DOWN,
}
TOP_TENSORS = {"transformer.wte": T.TOKEN_EMBD, "transformer.wpe": T.POS_EMBD, "transformer.ln_f": T.OUTPUT_NORM,
               "lm_head": T.OUTPUT}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def _name(module: str, suffix: str) -> str | None:
    if module in TOP_TENSORS:
        return tensor_name(TOP_TENSORS[module], suffix=suffix)
    match = _LAYER.match(module)
    if match and match.group(2) in LAYER_TENSORS:
        return tensor_name(LAYER_TENSORS[match.group(2)], int(match.group(1)), suffix)
    return None


def write_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def tensors(state: dict[str, torch.Tensor], config: Any) -> NamedTensors:
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older checkpoints, not weights
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, _, param = key.rpartition(".")
        name = _name(module, "." + param)
        if name is None:
            raise ValueError(f"tensor {key!r} has no place in llama.cpp's gpt2 layout")
        if param == "weight" and module.endswith(CONV1D):
            tensor = tensor.T  # Conv1D (in, out) -> (out, in)
        yield name, tensor


def lora_target(module: str, config: Any):
    name = _name(module, ".weight")
    return (name, lambda t: t) if name else None


GPT2 = register(
    Architecture(
        gguf_arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2],
        hf_classes=("GPT2LMHeadModel",),
        write_hparams=write_hparams,
        tensors=tensors,
        lora_target=lora_target,
    )
)
