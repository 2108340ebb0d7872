"""One decode step of a Llama-family model computed feature-major, outside transformers' module stack.

A decode step on the CPU is mostly reading weights: each projection multiplies a few rows as
(W x^T)^T (lora/base.py: decode_linear), which hands back a (rows, out) result only after
transposing the (out, rows) product. `decode_logits` keeps the hidden states of the step
feature-major instead, (features, rows), as that product comes out: a projection's output is the
next one's input without a transpose, norms reduce over the features, the MLP runs
down(silu(gate) * up) on (features, rows) blocks, and attention sees its heads as strided views.
It walks the decoder layers itself, so no module stack, mask builder or output record runs per
step. Plain linears (`lora.base.PLAIN_LINEARS`) multiply directly; a LoRA layer in a mixed-adapter
batch computes its base and its rows' terms feature-major as well, the batch's adapters side by
side (lora/mixed_features.py); any other projection (a LoRA layer outside a mixed batch, a DoRA
layer, a quantised layer) is called as a module on a (rows, 1, in) view and read back as a view.

It covers causal LMs of the Llama family whose every layer attends to the full cache
(`lean_decodes`): model types "llama" (SmolLM2 among them) and "qwen2", fp32 hidden states, a few
rows (`lora.base.FEW_ROWS`), CPU, no autograd. Anything else goes through the model's own forward.
The logits equal the model's forward to float rounding (the norms sum in another order); the same
cache is updated the same way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from lorakit.infer.kv_cache import RoomyLayer
from lorakit.lora.base import FEW_ROWS, PLAIN_LINEARS, weight_major_product
from lorakit.lora.mixed_features import features_forward

MODEL_TYPES = ("llama", "qwen2")


def decode_logits(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache
) -> torch.Tensor:
    """(B, V) logits after feeding each row's next token.

    Args:
        tokens: (B,) each row's last token, not yet in the cache.
        mask: (B, T + 1) 1 where the cache holds a row's token, the new token included.
        position: (B, 1) position of each row's token.
        cache: the DynamicCache of the rows; the step's keys and values are appended to it.
    """
    if lean_decodes(model, tokens, cache):
        return _lean_logits(model, tokens, mask, position, cache)
    return model(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=cache
    ).logits[:, -1]


_through_forward = 0  # > 0 inside `through_the_forward()`


@contextmanager
def through_the_forward():
    """Inside the block, every decode step runs through the model's own forward (to time both side by side)."""
    global _through_forward
    _through_forward += 1
    try:
        yield
    finally:
        _through_forward -= 1


def lean_decodes(model: nn.Module, tokens: torch.Tensor, cache) -> bool:
    """Whether `decode_logits` computes this step itself rather than through the model's forward."""
    config = model.config
    return (
        not _through_forward
        and config.model_type in MODEL_TYPES
        and not torch.is_grad_enabled()
        and not model.training
        and tokens.device.type == "cpu"
        and 0 < tokens.shape[0] <= FEW_ROWS
        and model.model.norm.weight.dtype == torch.float32
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())
        and all(type(layer) in (DynamicLayer, RoomyLayer) for layer in cache.layers)
    )


def _lean_logits(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache):
    inner, config = model.model, model.config
    rows = tokens.shape[0]
    embeds = inner.embed_tokens(tokens[:, None])  # (B, 1, H)
    cos, sin = inner.rotary_emb(embeds, position)  # (B, 1, D) each
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1, D): broadcast over (B, kv heads, group, D)
    # (B, 1, 1, T): -inf on the left padding; made once a step rather than by attention in every layer
    keep = torch.zeros(mask.shape, dtype=embeds.dtype).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
    hidden = embeds[:, 0].t().contiguous()  # (H, B) residual stream
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = attn.head_dim
        normed = _Input(_rms_norm(hidden, layer.input_layernorm))
        # A query of one token per row: the heads sharing a key/value head are its group of queries.
        query = _project(attn.q_proj, normed).view(kv_heads, heads // kv_heads, head_dim, rows).permute(3, 0, 1, 2)
        key = _project(attn.k_proj, normed).view(kv_heads, 1, head_dim, rows).permute(3, 0, 1, 2)
        value = _project(attn.v_proj, normed).view(kv_heads, 1, head_dim, rows).permute(3, 0, 1, 2)
        query, key = _rotate(query, cos, sin).contiguous(), _rotate(key, cos, sin)
        keys, values = cache.update(key, value, index)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=keep, scale=attn.scaling)
        hidden = hidden + _project(attn.o_proj, _Input(out.reshape(rows, heads * head_dim).t()))
        normed = _Input(_rms_norm(hidden, layer.post_attention_layernorm))
        mlp = layer.mlp
        gated = F.silu(_project(mlp.gate_proj, normed)) * _project(mlp.up_proj, normed)
        hidden = hidden + _project(mlp.down_proj, _Input(gated))
    return _project(model.lm_head, _Input(_rms_norm(hidden, inner.norm))).t()


class _Input:
    """A projection input, feature-major (in, B), and the (B, 1, in) view of it that modules are called
    on: one view object for all the projections fed the same input, so a LoRA sibling group computes
    its shared x A^T once (lora/mixed.py keys it on the input)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._rows: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.x.t().contiguous()[:, None]
        return self._rows


def _project(module: nn.Module, given: _Input) -> torch.Tensor:
    """module(x) for a feature-major input x, (in, B) -> (out, B)."""
    if type(module) in PLAIN_LINEARS:
        return weight_major_product(given.x, module.weight, module.bias)
    state = getattr(module, "row_adapters", None)
    if state is not None and not module.disabled:  # a LoRA layer in a mixed-adapter batch
        out = features_forward(state, module, given.x)
        if out is not None:
            return out
    return module(given.rows)[:, 0].t()


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Llama's RMSNorm over the features of feature-major x (H, B)."""
    return norm.weight[:, None] * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + norm.variance_epsilon))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
