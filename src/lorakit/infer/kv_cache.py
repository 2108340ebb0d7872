"""A KV cache that appends each step in place, for lorakit's decode loops.

transformers' `DynamicLayer` concatenates each step's keys and values onto the whole cache, so every
decode step copies all of it: 16 rows of ~100 tokens over SmolLM2-135M's 30 layers move ~70 MB a
step. A `RoomyLayer` keeps room for ROOM more tokens along the sequence and writes each step's
states into it; attention gets a view of the filled part: the room's first rows, a run of its tokens.
A view cut from that one (leading tokens no row uses any more, trailing rows) still appends in place.
A continuous batch's rows come and go without moving the others (`keep_rows`: a leaving row's place
is taken by one of the last rows; `join_rows`: the joiners' prefilled rows written into the room's
spare rows, or all rows copied once into fresh room), where concatenating and selecting rows would
copy the whole cache twice, once then once more into room at the next step. Code that swaps `keys` /
`values` for other tensors needs no care: the next update moves them into fresh room.
`roomy_cache(config)` is a `DynamicCache` whose full-attention layers are RoomyLayers.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 64  # spare tokens allocated at a time: one copy of the cache every ROOM steps, not every step
SPARE_ROWS = 4  # spare rows of room `join_rows` allocates: rows joining later go in without moving the others


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

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> bool:
        """Keep the first `rows` rows after copying row `source` onto row `target` for each (target, source) of
        `moves` (targets below `rows`, sources at or past it), in the room; False (nothing changed) where the keys
        and values are not views of their rooms."""
        start, rooms = _start_in(self.keys, self._rooms[0]), self._rooms
        if start is None or start != _start_in(self.values, rooms[1]):
            return False
        length = self.keys.shape[-2]
        for room in rooms:
            for target, source in moves:
                room[target, :, start : start + length] = room[source, :, start : start + length]
        self.keys, self.values = (room[:rows, :, start : start + length] for room in rooms)
        return True


def roomy_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose plain (full-attention) layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def keep_rows(cache: DynamicCache, keep: list[int]) -> list[int]:
    """Keep the rows at positions `keep` (ascending) of every layer of `cache`; returns the rows' new order. The kept
    rows stay where they are, and a leaving row's place is taken by a kept row from past the new last row (one row
    copied per place, in the layer's room), so the order is `keep`'s but for those; layers that are not views of their
    rooms take that order by selecting rows (copies)."""
    count, kept = len(keep), set(keep)
    holes = [row for row in range(count) if row not in kept]
    moves = list(zip(holes, [row for row in keep if row >= count]))
    order = list(range(count))
    for target, source in moves:
        order[target] = source
    index = None
    for layer in cache.layers:
        if not (type(layer) is RoomyLayer and layer.is_initialized and layer.move_rows(moves, count)):
            index = torch.tensor(order, dtype=torch.long, device=layer.keys.device) if index is None else index
            layer.batch_select_indices(index)
    return order


def join_rows(layer: DynamicLayer, other: DynamicLayer, width: int) -> None:
    """`layer`'s rows, then `other`'s, each left-padded with zeros to `width` tokens. A RoomyLayer whose room has
    rows to spare and whose rows are `width` tokens already takes `other`'s rows into its room, its own rows left
    where they are; else both are copied once into fresh room (ROOM more tokens, SPARE_ROWS more rows). Another
    layer is concatenated."""
    mine, theirs = (layer.keys, layer.values), (other.keys, other.values)
    if type(layer) is not RoomyLayer:
        layer.keys, layer.values = (torch.cat([_padded(m, width), _padded(t, width)]) for m, t in zip(mine, theirs))
        return
    rows, joining, rooms = mine[0].shape[0], theirs[0].shape[0], layer._rooms
    start = _start_in(mine[0], rooms[0])
    if not (start is not None and start == _start_in(mine[1], rooms[1]) and mine[0].shape[-2] == width
            and rows + joining <= rooms[0].shape[0]):
        start, rooms = 0, tuple(
            m.new_empty((rows + joining + SPARE_ROWS, m.shape[1], width + ROOM, m.shape[-1])) for m in mine)
        for room, states in zip(rooms, mine):
            _write_rows(room, states, slice(0, rows), width)
    for room, states in zip(rooms, theirs):
        _write_rows(room[:, :, start:], states, slice(rows, rows + joining), width)
    layer._rooms = rooms
    layer.keys, layer.values = (room[: rows + joining, :, start : start + width] for room in rooms)


def _write_rows(room: torch.Tensor, states: torch.Tensor, rows: slice, width: int) -> None:
    """`states` (B, heads, T, D) into `rows` of room's first `width` tokens, zeros on their left: masked out, and
    never stale values (an inf or a NaN would spread)."""
    left = width - states.shape[-2]
    room[rows, :, :left] = 0
    room[rows, :, left:width] = states


def _padded(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, T, D) states with zeros on the left of the sequence up to `width` tokens."""
    missing = width - states.shape[-2]
    return states if missing == 0 else torch.nn.functional.pad(states, (0, 0, missing, 0))


def _start_in(cached: torch.Tensor, room: torch.Tensor | None) -> int | None:
    """The token at which `cached` starts in `room` where it is a view of the room's first rows, all its heads and
    a run of its tokens; else None."""
    if (room is None or cached.dim() != 4 or not cached.numel() or cached.stride() != room.stride()
            or cached.shape[0] > room.shape[0] or cached.shape[1] != room.shape[1] or cached.shape[3] != room.shape[3]
            or cached.untyped_storage().data_ptr() != room.untyped_storage().data_ptr()):
        return None
    offset, step = cached.storage_offset() - room.storage_offset(), room.stride(2)
    if offset < 0 or offset % step or offset // step + cached.shape[2] > room.shape[2]:
        return None
    return offset // step


def _append(cached: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cached + new along the sequence (dim -2), written into `room` when cached is a view of it and
    the new states fit; otherwise into a fresh buffer. Returns the filled view and its buffer."""
    filled, room = _grow(cached, room, new.shape[-2], new)
    filled[:, :, filled.shape[-2] - new.shape[-2] :] = new
    return filled, room


def _grow(cached: torch.Tensor, room: torch.Tensor | None, count: int, like: torch.Tensor | None = None):
    """(the filled view of cached and `count` more tokens, its buffer): `room` where cached is a view of it
    (`_start_in`) and they fit, else a fresh buffer shaped as `like` (cached where None) with ROOM spare tokens;
    the new tokens are left unwritten."""
    length = cached.shape[-2] if cached.numel() else 0
    total = length + count
    start = _start_in(cached, room)
    if start is not None and start + total <= room.shape[-2]:
        return room[: cached.shape[0], :, start : start + total], room
    like = cached if like is None else like
    room = like.new_empty((*like.shape[:2], total + ROOM, like.shape[-1]))
    if length:
        room[:, :, :length] = cached
    return room[:, :, :total], room
