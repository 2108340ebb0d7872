"""A KV cache that appends each step in place, for lorakit's decode loops.

transformers' `DynamicLayer` concatenates each step's keys and values onto the whole cache, so every
decode step copies all of it: 16 rows of ~100 tokens over SmolLM2-135M's 30 layers move ~70 MB a
step. A `RoomyLayer` keeps room for ROOM more tokens along the sequence and writes each step's
states into it; attention gets a view of the filled part. Code that swaps `keys` / `values` for other
tensors (rows leaving, rows joining, columns cut) needs no care: the next update moves them into
fresh room. `roomy_cache(config)` is a `DynamicCache` whose full-attention layers are RoomyLayers.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 64  # spare tokens allocated at a time: one copy of the cache every ROOM steps, not every step


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room to grow along the sequence."""

    _rooms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys_room, values_room = self._rooms
        self.keys, keys_room = _append(self.keys, keys_room, key_states)
        self.values, values_room = _append(self.values, values_room, value_states)
        self._rooms = (keys_room, values_room)
        return self.keys, self.values

    def reserve(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for `count` more tokens of an initialized layer: its keys and values, their last `count` tokens
        not yet written (infer/decode_layer.py writes them)."""
        keys_room, values_room = self._rooms
        self.keys, keys_room = _grow(self.keys, keys_room, count)
        self.values, values_room = _grow(self.values, values_room, count)
        self._rooms = (keys_room, values_room)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._rooms = (None, None)


def roomy_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose plain (full-attention) layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _append(cached: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cached + new along the sequence (dim -2), written into `room` when cached is its filled start and
    the new states fit; otherwise into a fresh buffer. Returns the filled view and its buffer."""
    filled, room = _grow(cached, room, new.shape[-2], new)
    filled[:, :, filled.shape[-2] - new.shape[-2] :] = new
    return filled, room


def _grow(cached: torch.Tensor, room: torch.Tensor | None, count: int, like: torch.Tensor | None = None):
    """(the filled view of cached and `count` more tokens, its buffer): `room` where cached is its filled start and
    they fit, else a fresh buffer shaped as `like` (cached where None) with ROOM spare tokens; the new tokens are
    left unwritten."""
    length = cached.shape[-2] if cached.numel() else 0
    total = length + count
    fits = (
        room is not None
        and length > 0
        and cached.data_ptr() == room.data_ptr()
        and cached.shape[:2] == room.shape[:2]
        and cached.stride() == room.stride()
        and total <= room.shape[-2]
    )
    if not fits:
        like = cached if like is None else like
        room = like.new_empty((*like.shape[:2], total + ROOM, like.shape[-1]))
        if length:
            room[:, :, :length] = cached
    return room[:, :, :total], room
