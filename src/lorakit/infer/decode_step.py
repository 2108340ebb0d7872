"""One decode step of a Llama-family model computed feature-major, outside transformers' module stack.

A decode step on the CPU is mostly reading weights: each projection multiplies a few rows as
(W x^T)^T (lora/base.py: decode_linear), which hands back a (rows, out) result only after
transposing the (out, rows) product. `decode_logits` keeps the hidden states of the step
feature-major instead, (features, rows), as that product comes out: a projection's output is the
next one's input without a transpose, norms reduce over the features, the MLP runs
down(silu(gate) * up) on (features, rows) blocks, and attention sees its heads as strided views.
It walks the decoder layers itself, so no module stack, mask builder or output record runs per
step. Frozen linears (`lora.base.FROZEN_LINEARS`, int8 ones too) multiply directly; a LoRA layer in a mixed-adapter
batch computes its base and its rows' terms feature-major as well, the batch's adapters side by
side (lora/mixed_features.py); any other projection (a LoRA layer outside a mixed batch, a DoRA
layer, a quantised layer) is called as a module on a (rows, 1, in) view and read back as a view.

It covers causal LMs of the Llama family whose every layer attends to the full cache
(`lean_decodes`): model types "llama" (SmolLM2 among them) and "qwen2", fp32 hidden states, a few
rows (`lora.base.FEW_ROWS`), CPU, no autograd. Anything else goes through the model's own forward.
The logits equal the model's forward to float rounding (the norms sum in another order); the same
cache is updated the same way. A batch's prompt pass runs the same walk (`prefill_logits`): the
prompts' tokens side by side as columns, none of them padding, where a padded forward over prompts of
mixed lengths computes every row to the longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.infer import decode_layer, step_ops
from lorakit.infer.kv_cache import RoomyLayer, roomy_cache
from lorakit.lora.base import FEW_ROWS, FROZEN_LINEARS, frozen_features
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
        return _lean_logits(model, tokens, mask, position, cache)[0]
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
    return (
        lean_prefills(model)
        and tokens.device.type == "cpu"
        and 0 < tokens.shape[0] <= FEW_ROWS
        and all(type(layer) in (DynamicLayer, RoomyLayer) for layer in cache.layers)
    )


def lean_prefills(model: nn.Module) -> bool:
    """Whether `prefill_logits` (and a lean step's prompts) can run for this model, outside its forward."""
    config = model.config
    return (
        not _through_forward
        and config.model_type in MODEL_TYPES
        and not torch.is_grad_enabled()
        and not model.training
        and model.model.norm.weight.device.type == "cpu"
        and model.model.norm.weight.dtype == torch.float32
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())
    )


def prefill_logits(model: nn.Module, prompts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Prefill `prompts` in one pass without padding (`lean_prefills` must hold): their tokens are the
    products' columns one prompt after another, each prompt attends causally to itself, and only each
    prompt's last token goes through the head. A mixed-adapter state set on the LoRA layers covers
    every prompt token (each with its prompt's adapter); a LoRA output head narrows it to the prompts'
    last tokens.

    Returns each prompt's (n, V) logits after its last token, the prompts' KV cache (n rows,
    left-padded to the longest) and its (n, L) mask.
    """
    empty = torch.zeros(0, dtype=torch.long)
    return decode_and_prefill(model, empty, torch.zeros((0, 1), dtype=torch.long), empty[:, None], None, prompts)[1:]


def decode_and_prefill(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache,
    prompts: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, torch.Tensor]:
    """One pass that decodes the running rows a token and prefills `prompts` beside them (`lean_decodes`
    must hold for the rows; with no rows and no cache, `prefill_logits`). The prompts' tokens ride in the
    step's products as more columns, so the weights, which a decode step mostly spends its time reading,
    are read once for both; each prompt attends causally to itself. A mixed-adapter state set on the LoRA
    layers covers the rows and then every prompt token (each with its prompt's adapter); a LoRA output
    head narrows it to the columns whose logits are returned.

    Returns the rows' (B, V) next-token logits, each prompt's (n, V) logits after its last token, the
    prompts' KV cache (n rows, left-padded to the longest) and its (n, L) mask; the rows' cache is
    updated as `decode_logits` does.
    """
    lengths = [len(p) for p in prompts]
    logits, prompt_cache = _lean_logits(model, tokens, mask, position, cache, prompts)
    rows = tokens.shape[0]
    prompt_mask = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
    for b, length in enumerate(lengths):
        prompt_mask[b, prompt_mask.shape[1] - length :] = 1
    return logits[:rows], logits[rows:], prompt_cache, prompt_mask


def _lean_logits(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache,
    prompts: Sequence[list[int]] = (),
) -> tuple[torch.Tensor, DynamicCache | None]:
    """The rows' next-token logits, then each prompt's last-token logits ((B + n, V)), and the prompts' cache
    (None without prompts)."""
    inner, config = model.model, model.config
    rows, lengths = tokens.shape[0], [len(p) for p in prompts]
    ids = torch.cat([tokens, *(torch.tensor(p, dtype=torch.long) for p in prompts)])  # (N,) columns
    positions = torch.cat([position[:, 0], *(torch.arange(n) for n in lengths)])
    embeds = inner.embed_tokens(ids[:, None])[:, 0]  # (N, H)
    cos, sin = inner.rotary_emb(embeds[None], positions[None])  # (1, N, D) each
    cos, sin = cos[0, :, None], sin[0, :, None]  # (N, 1, D): broadcast over the heads
    # (B, 1, 1, T): -inf on the left padding; made once a step rather than by attention in every layer
    keep = torch.zeros(mask.shape, dtype=embeds.dtype).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    starts = [rows + sum(lengths[:j]) for j in range(len(lengths))]
    prompt_cache = roomy_cache(config) if prompts else None
    hidden = embeds.t().contiguous()  # (H, N) residual stream
    # a step of rows only: each layer in one C call where it serves (infer/decode_layer.py)
    whole = (cos[:, 0].contiguous(), sin[:, 0].contiguous(), keep.view(rows, -1)) \
        if not prompts and decode_layer.serves(rows) else None
    for index, layer in enumerate(inner.layers):
        if whole is not None and index < len(cache.layers) \
                and decode_layer.run(layer, hidden, *whole, cache.layers[index], config):
            continue
        attn = layer.self_attn
        head_dim = attn.head_dim
        normed = _Input(_rms_norm(hidden, layer.input_layernorm))
        query = _rotated(_project(attn.q_proj, normed), heads, head_dim, cos, sin)  # (N, heads, D)
        key = _rotated(_project(attn.k_proj, normed), kv_heads, head_dim, cos, sin)
        value = _project(attn.v_proj, normed).view(kv_heads, head_dim, -1).permute(2, 0, 1)  # (N, kv heads, D)
        attended = []
        if rows:  # a query of one token per row: the heads sharing a key/value head are its group of queries
            keys, values = cache.update(key[:rows, :, None], value[:rows, :, None], index)
            group = query[:rows].contiguous().view(rows, kv_heads, heads // kv_heads, head_dim)
            out = F.scaled_dot_product_attention(group, keys, values, attn_mask=keep, scale=attn.scaling)
            attended.append(out.reshape(rows, heads * head_dim))
        if prompts:
            attended += _prefill_attention(attn, query, key, value, starts, lengths, prompt_cache, index)
        attended = torch.cat(attended) if len(attended) > 1 else attended[0]
        hidden = hidden + _project(attn.o_proj, _Input(attended.t()))
        normed = _Input(_rms_norm(hidden, layer.post_attention_layernorm))
        mlp = layer.mlp
        gated = F.silu(_project(mlp.gate_proj, normed)) * _project(mlp.up_proj, normed)
        hidden = hidden + _project(mlp.down_proj, _Input(gated))
    if prompts:  # the logits of each row and of each prompt's last token only
        picked = [*range(rows), *(s + n - 1 for s, n in zip(starts, lengths))]
        hidden = hidden[:, picked]
        state = getattr(model.lm_head, "row_adapters", None)
        if state is not None:  # a LoRA head in a mixed batch: its state narrowed to those columns
            state.select(picked)
    logits = _project(model.lm_head, _Input(_rms_norm(hidden, inner.norm))).t()
    return logits, prompt_cache


def _prefill_attention(attn, query, key, value, starts, lengths, prompt_cache, index) -> list[torch.Tensor]:
    """Each prompt's causal self-attention, (L, heads x D) per prompt, from the step's (N, heads, D) queries
    and (N, kv heads, D) keys and values; the prompts' keys and values go into `prompt_cache`, left-padded."""
    out, keys, values = [], [], []
    width = max(lengths)
    for start, length in zip(starts, lengths):
        q, k, v = (x[start : start + length].transpose(0, 1)[None].contiguous() for x in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
        out.append(attended[0].transpose(0, 1).reshape(length, -1))
        keys.append(k if length == width else F.pad(k, (0, 0, width - length, 0)))
        values.append(v if length == width else F.pad(v, (0, 0, width - length, 0)))
    prompt_cache.update(*(torch.cat(states) if len(states) > 1 else states[0] for states in (keys, values)), index)
    return out


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
    if type(module) in FROZEN_LINEARS:
        return frozen_features(module, given.x)
    state = getattr(module, "row_adapters", None)
    if state is not None and not module.disabled:  # a LoRA layer in a mixed-adapter batch
        out = features_forward(state, module, given.x)
        if out is not None:
            return out
    return module(given.rows)[:, 0].t()


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Llama's RMSNorm over the features of feature-major x (H, B): in one call where step_ops serves."""
    out = step_ops.rms_norm(x, norm.weight, norm.variance_epsilon)
    if out is not None:
        return out
    return norm.weight[:, None] * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + norm.variance_epsilon))


def _rotated(projected: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of a projection's feature-major output (heads x D, N), as (N, heads, D): in one call
    where step_ops serves."""
    out = step_ops.rotate(projected, heads, head_dim, cos, sin)
    if out is not None:
        return out
    return _rotate(projected.view(heads, head_dim, -1).permute(2, 0, 1), cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
