"""A decode batch that requests join and leave between steps (continuous batching).

`generate_mixed` runs a fixed set of requests to the end. `RunningBatch` keeps a batch alive
instead: `join(...)` prefills new requests (each row with its adapter), picks their first token
and appends their rows to the running batch; `step()` decodes one token for every row. Where the
rows decode through lorakit's own step (infer/decode_step.py), the joiners' prompts are prefilled
in the same pass as a decode step of the running rows, which reads the weights once for both;
otherwise in a forward pass of their own. A row leaves the batch and the KV cache as soon as it
hits EOS, a stop string or its max_tokens, or its caller cancels it. Each row keeps its own
adapter, sampling settings, generator and KV length.

The KV cache is one left-padded `DynamicCache` (B, heads, T, head_dim), appended in place
(infer/kv_cache.py): a row shorter than the longest holds zero keys on its left, masked out by the
attention mask, and its positions are its own (position ids per row), so padding changes nothing a
row computes. Joining pads the shorter of the two caches on the left, the rows copied once into fresh
room; a leaving row's place is taken by one of the last rows, the others staying where they are, and
columns no remaining row uses are cut away (a view: nothing moves), so T stays the longest live row's
length. A row's place in the batch thus changes only when it fills a leaving row's.

Greedy outputs equal those of generating each request alone with its adapter merged (up to float
rounding, as for `generate_mixed`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.infer.decode_step import decode_and_prefill, decode_logits, lean_decodes, lean_prefills
from lorakit.infer.generate import stop_token_ids
from lorakit.infer.kv_cache import join_rows, keep_rows, roomy_cache
from lorakit.infer.multi_adapter import Completion, Request, _left_pad, _pad_id, _Row, padding
from lorakit.infer.sampling import next_tokens
from lorakit.lora.adapters import lora_layers
from lorakit.lora.mixed import RowAdapters, sibling_layers
from lorakit.lora.mixed_features import FeatureTerms

PREFILLS = ("beside", "apart")  # where `join` prefills: in the running rows' decode pass, or in a pass of its own
OnText = Callable[[str], bool | None]  # new text of the row (may be empty); False cancels the row
OnDone = Callable[[Completion], None]


@dataclass
class _Live:
    """A row of the running batch and where its text and completion go."""

    row: _Row
    on_text: OnText
    on_done: OnDone

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens this row may come to hold: its prompt and all its max_tokens."""
        return len(self.row.request.prompt_ids) + self.row.request.max_tokens


class RunningBatch:
    """Rows decoding together, one token per `step()`; new requests `join()` between steps.

    Not thread-safe: one thread drives it (the server's worker), and adapters must not be loaded
    or unloaded while `join` or `step` runs; call `adapters_changed()` after they were.
    """

    def __init__(self, model: nn.Module, tokenizer, strategy: str = "auto", prefill: str = "beside"):
        """`prefill`: "beside" prefills joiners in the running rows' decode pass where the rows decode through
        lorakit's step, "apart" always in a forward pass of their own."""
        if prefill not in PREFILLS:
            raise ValueError(f"prefill {prefill!r} is not one of {', '.join(PREFILLS)}")
        layers = DynamicCache(config=model.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ValueError(
                f"continuous batching needs a full KV cache in every layer; {type(model).__name__} has "
                "sliding-window or other cache layers (serve it with the per-batch scheduler)"
            )
        self.model, self.tokenizer, self.strategy, self.prefill = model, tokenizer, strategy, prefill
        self.device = next(model.parameters()).device
        self.eos = set(stop_token_ids(tokenizer, model))
        self.pad_id = _pad_id(tokenizer, self.eos)
        self.live: list[_Live] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (B, T): 1 where the cache holds a row's token
        self.position = torch.zeros((0, 1), dtype=torch.long)  # (B, 1): position of each row's next input
        self.tokens = torch.zeros(0, dtype=torch.long)  # (B,): each row's last token, not yet fed
        self._state: RowAdapters | None = None  # the decode batch's per-row adapters, built on demand
        self.adapters_changed()

    def __len__(self) -> int:
        return len(self.live)

    def adapters(self) -> list[str | None]:
        """The adapter of each row."""
        return [entry.row.request.adapter for entry in self.live]

    def kv_tokens(self) -> int:
        """KV-cache tokens the rows may come to hold (prompt + max_tokens each)."""
        return sum(entry.kv_tokens for entry in self.live)

    def adapters_changed(self) -> None:
        """Adapters were loaded or unloaded: find the LoRA layers again and rebuild the per-row state."""
        named = lora_layers(self.model)
        self.layers = [layer for _, layer in named]
        self.siblings = sibling_layers(named)
        self._state = None
        self._features = FeatureTerms()  # the decode steps' side-by-side factors, kept across joins

    @torch.no_grad()
    def join(self, requests: list[Request], on_text: list[OnText], on_done: list[OnDone]) -> None:
        """Prefill `requests` together, pick each one's first token, and add those that go on to the batch.
        Where the running rows decode through lorakit's step, they decode a token in the same pass (and an empty
        batch's joiners are prefilled by that step's walk, without padding).

        Raises:
            ValueError: an empty prompt or a max_tokens below 1 (nothing joins then).
        """
        for r in requests:
            if not r.prompt_ids or r.max_tokens < 1:
                raise ValueError("every request needs a non-empty prompt and max_tokens >= 1")
        entries = [
            _Live(
                _Row(r, torch.Generator(self.device).manual_seed(r.seed) if r.temperature > 0 else None), t, d
            )
            for r, t, d in zip(requests, on_text, on_done)
        ]
        lean = lean_decodes(self.model, self.tokens, self.cache) if self.live else lean_prefills(self.model)
        if self.prefill == "beside" and lean:
            self._join_beside_a_step(requests, entries)
            return
        ids, mask = _left_pad([r.prompt_ids for r in requests], self.pad_id, self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L): left padding does not shift positions
        cache = roomy_cache(self.model.config)
        # Joining a gathered decode state, the joiners' prefill state is built gathered too, so that it
        # can be appended to it afterwards (RowAdapters.extend) rather than every row's copies rebuilt.
        strategy = self.strategy
        if strategy == "auto" and self._state is not None and self._state.strategy == "gathered":
            strategy = "gathered"
        state = RowAdapters([r.adapter for r in requests], strategy, self.siblings)
        state.features = self._features  # the kept side-by-side factors: valid until adapters_changed()
        state.padding = padding(mask)
        with self._adapters(state):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                logits_to_keep=1,
            ).logits[:, -1]
        state.padding = None
        self._admit_prefilled(entries, logits, cache, mask, position[:, -1:] + 1, state)

    def _join_beside_a_step(self, requests: list[Request], entries: list[_Live]) -> None:
        """Prefill the joiners' prompts in the same pass as a decode step of the running rows
        (infer/decode_step.py: decode_and_prefill), which reads the weights once for both; with no running rows,
        the prompts alone, without padding."""
        prompts = [r.prompt_ids for r in requests]
        columns = self.adapters() + [r.adapter for r in requests for _ in r.prompt_ids]
        state = RowAdapters(columns, self.strategy, self.siblings)
        state.features = self._features
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
        with self._adapters(state):
            logits, prompt_logits, cache, prompt_mask = decode_and_prefill(
                self.model, self.tokens, mask, self.position, self.cache, prompts
            )
        if self.live:
            self._stepped(logits, mask)
        position = torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=self.device)
        state = RowAdapters([r.adapter for r in requests], self.strategy, self.siblings)
        self._admit_prefilled(entries, prompt_logits, cache, prompt_mask, position, state)

    def _admit_prefilled(self, entries: list[_Live], logits, cache, mask, position, state: RowAdapters) -> None:
        """Pick the prefilled rows' first tokens and add those that go on below the running rows."""
        tokens = self._sample(logits, entries)
        chosen = tokens.tolist()  # one device-to-host copy, not one per row
        keep = [b for b, entry in enumerate(entries) if self._advance(entry, chosen[b])]
        if len(keep) < len(entries):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            cache.batch_select_indices(index)
            state.select(keep)
            tokens, mask, position = tokens[index], mask[index], position[index]
            entries = [entries[b] for b in keep]
        if entries:
            self._append(entries, cache, mask, position, tokens, state)

    @torch.no_grad()
    def step(self) -> None:
        """Decode one token for every row; rows that finish or are cancelled leave."""
        if not self.live:
            return
        if self._state is None:
            self._state = RowAdapters(self.adapters(), self.strategy, self.siblings)
            self._state.features = self._features
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
        with self._adapters(self._state):
            logits = decode_logits(self.model, self.tokens, mask, self.position, self.cache)
        self._stepped(logits, mask)

    def _stepped(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """After a decode step of the rows (their logits, the mask it ran with): each row's next token;
        rows that finish or are cancelled leave."""
        self.mask, self.position = mask, self.position + 1
        self.tokens = self._sample(logits, self.live)
        chosen = self.tokens.tolist()
        keep = [b for b, entry in enumerate(self.live) if self._advance(entry, chosen[b])]
        if len(keep) < len(self.live):
            self._select(keep)

    def cancel_all(self) -> list[_Live]:
        """Drop every row (their on_done is not called); returns them."""
        dropped, self.live = self.live, []
        self.cache, self._state = None, None
        self.mask, self.position, self.tokens = self.mask[:0, :0], self.position[:0], self.tokens[:0]
        return dropped

    # -- internals ------------------------------------------------------------------------------
    @contextmanager
    def _adapters(self, state: RowAdapters):
        """Row i of the next forward uses its own adapter (set only for the forward: between steps the
        layers are left alone, so loading an adapter never sees a stale batch state)."""
        for layer in self.layers:
            layer.row_adapters = state
        try:
            yield
        finally:
            for layer in self.layers:
                layer.row_adapters = None

    def _sample(self, logits: torch.Tensor, entries: list[_Live]) -> torch.Tensor:
        rows = [e.row for e in entries]
        return next_tokens(
            logits,
            [r.request.temperature for r in rows],
            [r.request.top_p for r in rows],
            [r.generator for r in rows],
        )

    def _advance(self, entry: _Live, token: int) -> bool:
        """Add one token to a row and hand out its new text; True while it keeps generating."""
        row = entry.row
        row.push(token, self.eos, self.tokenizer)
        if entry.on_text(row.new_text()) is False and row.finish_reason is None:
            row.finish_reason = "cancelled"
        if row.finish_reason is None:
            return True
        entry.on_done(Completion(row.text, row.tokens, row.finish_reason, len(row.request.prompt_ids)))
        return False

    def _select(self, keep: list[int]) -> None:
        """Keep the rows at positions `keep`; cut the cache columns no remaining row uses. The kept rows stay in place
        but for those that move into a leaving row's place (kv_cache.keep_rows): the rows' order is the cache's."""
        if not keep:
            self.cancel_all()
            return
        keep = keep_rows(self.cache, keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self._state is not None:
            self._state.select(keep)
        self.live = [self.live[b] for b in keep]
        self.mask, self.position, self.tokens = self.mask[index], self.position[index], self.tokens[index]
        first = int(self.mask.any(dim=0).long().argmax())  # the first column some row still uses
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _append(self, entries: list[_Live], cache: DynamicCache, mask, position, tokens, state: RowAdapters) -> None:
        """Add prefilled rows (their cache, mask, next positions, last tokens and adapter state) below the
        running ones."""
        if not self.live:
            self.live, self.cache, self.mask, self.position, self.tokens = (
                entries,
                cache,
                mask,
                position,
                tokens,
            )
            self._state = state  # their prefill's per-row adapters serve their decoding
            state.features = self._features
            return
        if lean_decodes(self.model, self.tokens, self.cache):
            # Decoding feature-major reads the side-by-side factors, which outlive the state: the next
            # step's new state only sets the rows' adapters (no per-row copies to append).
            self._state = None
        elif self._state is not None and not self._state.extend(state):
            self._state = None  # rebuilt for the new set of rows at the next step
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            join_rows(old, new, width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.position = torch.cat([self.position, position])
        self.tokens = torch.cat([self.tokens, tokens])
        self.live += entries


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A (B, T) mask with zeros on the left up to `width` tokens."""
    missing = width - mask.shape[-1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
