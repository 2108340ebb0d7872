"""What Llama-style decoders share: the hyperparameter keys and the per-layer tensor layout.

transformers' `model.layers.N.self_attn.q_proj` and friends map one to one onto llama.cpp's
`blk.N.attn_q`; the architectures differ only in what they do to a tensor on the way (Llama
permutes q and k) and in a few extra keys.
"""

from __future__ import annotations

import re
from typing import Any

import gguf

from lorakit.export.arch import UnsupportedArchitectureError, tensor_name

T = gguf.MODEL_TENSOR
LAYER_TENSORS = {
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
    "input_layernorm": T.ATTN_NORM,
    "post_attention_layernorm": T.FFN_NORM,
}
TOP_TENSORS = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(module: str, suffix: str) -> str | None:
    """llama.cpp's name for transformers module path `module` plus `suffix` (".weight"/".bias")."""
    if module in TOP_TENSORS:
        return tensor_name(TOP_TENSORS[module], suffix=suffix)
    match = _LAYER.match(module)
    if match and match.group(2) in LAYER_TENSORS:
        return tensor_name(LAYER_TENSORS[match.group(2)], int(match.group(1)), suffix)
    return None


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict:
    """The config's RoPE settings as one dict (transformers 5 `rope_parameters`, older `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def write_decoder_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """The keys every Llama-style decoder carries, in the order llama.cpp's converter writes them."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = rope_parameters(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind not in ("default", None):
        raise UnsupportedArchitectureError(
            f"GGUF export does not support rope_type {kind!r} yet; supported: default, linear"
        )
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
