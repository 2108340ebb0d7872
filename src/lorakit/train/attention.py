"""Grouped-query attention without copying keys and values, for training on the CPU.

transformers' SDPA path repeats each key/value head `num_attention_heads / num_key_value_heads`
times before calling `scaled_dot_product_attention` whenever an attention mask is given, which is
always the case for packed rows. Autograd then keeps the repeated copies: for SmolLM2 (9 query
heads, 3 key/value heads) that is three times the key/value memory in every layer. PyTorch's CPU
kernels take grouped heads directly (`enable_gqa=True`) with a mask, so this attention function
passes them through; everywhere else (a GPU, a paged cache, a position bias) it hands over to
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lorakit_sdpa"


def grouped_sdpa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """(batch, heads, q, dim) query, (batch, kv_heads, k, dim) key/value -> ((batch, q, heads, dim), None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.device.type != "cpu" or kwargs.get("cache") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to `grouped_sdpa_attention`; True if switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "num_key_value_heads", None) in (None, getattr(config, "num_attention_heads", None)):
        return False  # no grouped heads: nothing to save
    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
