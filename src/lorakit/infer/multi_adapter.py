"""Generate for a batch of requests that each name their own adapter, in one forward pass per step.

Each request brings its prompt ids, adapter (or None for the base), max_tokens, sampling settings
and stop strings. The prompts are prefilled in one pass, side by side without padding where lorakit
walks the model itself (infer/decode_step.py: `prefill_logits`), else left-padded through the model's
forward; every step then runs the batch once with `lora.mixed.row_adapters` set, so row i goes
through its own adapter, and the KV cache (left-padded) carries the past. A row leaves the batch
(and the cache) when it hits EOS, a stop string or its max_tokens, so short requests stop costing
compute.

Greedy outputs equal those of generating each request alone with its adapter merged (up to float
rounding of W x + s B A x against (W + s B A) x, which has never flipped a token in the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.infer.generate import cut_at_stop, stop_token_ids
from lorakit.infer.decode_step import decode_logits, lean_prefills, prefill_logits
from lorakit.infer.kv_cache import roomy_cache
from lorakit.infer.sampling import next_tokens
from lorakit.lora.mixed import row_adapters


@dataclass
class Request:
    """One completion request. `adapter` None means the bare base model."""

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens tokens (benchmarks)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int


@dataclass
class _Row:
    """A request in flight: its tokens so far and how much of its text was already handed out."""

    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already passed to on_text
    finish_reason: str | None = None

    def push(self, token: int, eos: set[int], tokenizer) -> None:
        if token in eos and not self.request.ignore_eos:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.text, stopped = cut_at_stop(self.text, self.request.stop)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.request.max_tokens:
            self.finish_reason = "length"

    def new_text(self) -> str:
        """Text not yet handed out, holding back what may still become a stop string or a character."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= _held_back(self.text, self.request.stop)
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the tail of `text` that must not be streamed yet."""
    tail = len(text) - len(text.rstrip("\ufffd"))  # an incomplete multi-byte character
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                tail = max(tail, k)
                break
    return tail


OnText = Callable[[int, str], bool | None]


@torch.no_grad()
def generate_mixed(
    model: nn.Module,
    tokenizer,
    requests: list[Request],
    on_text: OnText | None = None,
    strategy: str = "auto",
) -> list[Completion]:
    """Run all `requests` as one batch, each with its own adapter; returns one Completion per request.

    Args:
        on_text: called after every step as on_text(i, new_text) for each request i still running
            (new_text may be empty); returning False cancels request i.
        strategy: how the LoRA terms are computed, see `lora.mixed` ("auto", "stacked", "gathered" or "grouped").
    Raises:
        ValueError: an empty prompt or a max_tokens below 1.
    """
    for i, r in enumerate(requests):
        if not r.prompt_ids or r.max_tokens < 1:
            raise ValueError(f"request {i}: needs a non-empty prompt and max_tokens >= 1")
    device = next(model.parameters()).device
    eos = set(stop_token_ids(tokenizer, model))
    rows = [
        _Row(r, torch.Generator(device).manual_seed(r.seed) if r.temperature > 0 else None) for r in requests
    ]
    was_training = model.training
    if was_training:  # each call walks every module, thousands with many adapters loaded
        model.eval()
    live = by_adapter(requests)  # request index of each batch row: the rows of one adapter next to each other
    ordered = [requests[i] for i in live]
    try:
        lean = lean_prefills(model)  # the prompts side by side without padding (CPU, Llama family)
        if lean:  # their tokens are the pass's columns, each with its request's adapter
            prompts = [r.prompt_ids for r in ordered]
            with row_adapters(model, [r.adapter for r in ordered for _ in r.prompt_ids], strategy) as columns:
                logits, cache, mask = prefill_logits(model, prompts)
            position = torch.tensor([[len(p) - 1] for p in prompts], dtype=torch.long, device=device)
        with row_adapters(model, [r.adapter for r in ordered], strategy) as state:
            if lean:
                state.features = columns.features  # the side-by-side factors the prompt pass built
            else:  # the same state serves the padded prompt pass and the steps: its per-row factors built once
                logits, cache, mask, position = _padded_prompt_pass(model, state, ordered, _pad_id(tokenizer, eos))
            while True:
                tokens = next_tokens(
                    logits,
                    [rows[i].request.temperature for i in live],
                    [rows[i].request.top_p for i in live],
                    [rows[i].generator for i in live],
                )
                chosen = tokens.tolist()  # one device-to-host copy per step, not one per row
                keep = [b for b, i in enumerate(live) if _step(rows[i], i, chosen[b], eos, tokenizer, on_text)]
                if not keep:
                    break
                if len(keep) < len(live):  # finished rows leave the batch and the cache
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    state.select(keep)
                    tokens, mask, position = tokens[index], mask[index], position[index]
                    live = [live[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                position = position[:, -1:] + 1
                logits = decode_logits(model, tokens, mask, position, cache)
    finally:
        if was_training:
            model.train()
    return [Completion(r.text, r.tokens, r.finish_reason, len(r.request.prompt_ids)) for r in rows]


def by_adapter(requests: list[Request]) -> list[int]:
    """The requests' indices with those of one adapter next to each other (the base's first, then by name; in
    arrival order within an adapter). A batch in that order reads each adapter's factors for consecutive rows,
    which the per-row LoRA kernels do faster than for rows spread over the batch (a batch of 16 requests over 4
    adapters: ~5% less time a call here)."""
    return sorted(range(len(requests)), key=lambda i: (requests[i].adapter is not None, requests[i].adapter or ""))


def _padded_prompt_pass(model: nn.Module, state, requests: list[Request], pad_id: int):
    """The prompts left-padded into one batch through the model's forward, under the rows' adapter `state`: each
    row's last-token logits (B, V), the KV cache (appended in place by the steps: infer/kv_cache.py), the mask
    (B, L) and positions (B, L)."""
    device = next(model.parameters()).device
    ids, mask = _left_pad([r.prompt_ids for r in requests], pad_id, device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): left padding does not shift positions
    cache = roomy_cache(model.config)
    state.padding = padding(mask)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, logits_to_keep=1
    ).logits[:, -1]
    state.padding = None
    return logits, cache, mask, position


def _step(row: _Row, i: int, token: int, eos: set[int], tokenizer, on_text: OnText | None) -> bool:
    """Add one token to a row; True while the row keeps generating."""
    row.push(token, eos, tokenizer)
    if on_text is not None and on_text(i, row.new_text()) is False and row.finish_reason is None:
        row.finish_reason = "cancelled"
    return row.finish_reason is None


def _pad_id(tokenizer, eos: set[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)


def padding(mask: torch.Tensor) -> torch.Tensor | None:
    """Where a left-padded batch's attention mask (B, L) is padding, or None where it has none."""
    pad = mask == 0
    return pad if bool(pad.any()) else None


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :] = torch.tensor(prompt)
        mask[b, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)
