"""Grouped-query attention without copying keys and values, for training on the CPU.

transformers' SDPA path repeats each key/value head `num_attention_heads / num_key_value_heads`
times before calling `scaled_dot_product_attention` whenever an attention mask is given, which is
always the case for packed rows. Autograd then keeps the repeated copies: for SmolLM2 (9 query
heads, 3 key/value heads) that is three times the key/value memory in every layer. PyTorch's CPU
kernels take grouped heads directly (`enable_gqa=True`) with a mask, so this attention function
passes them through; everywhere else (a GPU, a paged cache, a position bias) it hands over to
transformers' own SDPA function unchanged.

Packed rows (data/packing.py) get a block-diagonal causal mask, and a masked SDPA computes every
query against every key of the row, the masked-out blocks included. Where the mask is exactly the
one the position ids describe (each example attending to itself), each example runs as its own
causal SDPA instead (`example_spans`), as long as that does less work counting a fixed cost per
call (`SPAN_COST`): on SmolLM2-135M's packed ROS 2 rows (2 rows of ~180-240 tokens, 4-6 examples
each), a whole training step ran 1.06-1.14x as fast as with the masked rows. Every query still
sees exactly the keys the mask allows, so the result is the masked one up to float rounding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lorakit_sdpa"
# One SDPA call's fixed cost in attention scores: below about this many an example's call costs more than its
# share of the masked row (measured: a call ~45 us, a score ~55-65 ns, forward and backward).
SPAN_COST = 2000


def grouped_sdpa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """(batch, heads, q, dim) query, (batch, kv_heads, k, dim) key/value -> ((batch, q, heads, dim), None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.device.type != "cpu" or kwargs.get("cache") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    spans = example_spans(attention_mask, kwargs.get("position_ids"), query.shape[2], key.shape[2])
    if spans is not None and not dropout:
        return _by_example(query, key, value, spans, scaling), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _by_example(query, key, value, spans: list[list[tuple[int, int]]], scaling: float | None) -> torch.Tensor:
    """(batch, q, heads, dim): each example's causal attention over its own span of its row."""
    # unbind and split rather than indexing: their backward puts the pieces' gradients together in one
    # tensor, where an index's would make a zero-filled tensor of the whole input for every piece
    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans):
        lengths = [stop - start for start, stop in row]
        parts = [
            F.scaled_dot_product_attention(q_part[None], k_part[None], v_part[None], scale=scaling, is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
            for q_part, k_part, v_part in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


# weak references to the last mask and position ids seen, and their spans: one check per forward
_last_seen: tuple = (None, None, None)


def example_spans(mask, position_ids, q_len: int, k_len: int) -> list[list[tuple[int, int]]] | None:
    """Each row's examples as (start, stop) spans, where `mask` (batch, 1, q, k, bool) is exactly the causal
    mask of examples whose position ids restart at 0, and attending by example costs less than the masked
    row (SPAN_COST); else None. Every layer of a forward gets the same mask: it is checked once."""
    global _last_seen
    if mask is None or position_ids is None or mask.dtype != torch.bool or mask.dim() != 4 or q_len != k_len \
            or mask.shape[-1] != k_len or position_ids.shape[-1] != q_len:
        return None
    seen_mask, seen_positions, spans = _last_seen
    if seen_mask is not None and seen_mask() is mask and seen_positions() is position_ids:
        return spans
    spans = _spans_of(mask, position_ids)
    _last_seen = (weakref.ref(mask), weakref.ref(position_ids), spans)
    return spans


def _spans_of(mask: torch.Tensor, position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    rows, length = mask.shape[0], mask.shape[-1]
    positions = position_ids.expand(rows, length).tolist()
    spans = [[start for start, p in enumerate(row) if p == 0] for row in positions]
    if any(not starts or starts[0] != 0 for starts in spans):
        return None
    spans = [list(zip(starts, [*starts[1:], length])) for starts in spans]
    work = sum((stop - start) ** 2 + SPAN_COST for row in spans for start, stop in row)
    if work > rows * length * length:
        return None
    expected = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    for b, row in enumerate(spans):
        for start, stop in row:
            expected[b, 0, start:stop, start:stop] = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
    return spans if torch.equal(mask.expand(rows, 1, length, length).cpu(), expected) else None


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
