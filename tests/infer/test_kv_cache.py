"""RoomyLayer: each step's keys and values are written into spare room, not concatenated; what
attention sees and what the model generates equal transformers' DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from conftest import toy_model_folder
from lorakit.infer.kv_cache import ROOM, SPARE_ROWS, RoomyLayer, join_rows, keep_rows, roomy_cache
from lorakit.models import load_causal_lm


def test_steps_append_in_place_until_the_room_is_full():
    layer = RoomyLayer()
    first = torch.randn(2, 3, 5, 4)
    keys, _ = layer.update(first, first + 1)
    room = keys.data_ptr()
    steps = [torch.randn(2, 3, 1, 4) for _ in range(ROOM + 1)]
    for n, step in enumerate(steps[:ROOM], 1):
        keys, values = layer.update(step, step + 1)
        assert keys.data_ptr() == room and keys.shape[-2] == 5 + n  # written into the same buffer
    keys, values = layer.update(steps[ROOM], steps[ROOM] + 1)
    assert keys.data_ptr() != room  # full: moved into fresh room once
    expected = torch.cat([first, *steps], dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, expected + 1)


def test_keys_replaced_from_outside_move_into_fresh_room():
    layer = RoomyLayer()
    layer.update(torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4))
    layer.batch_select_indices(torch.tensor([2, 0]))  # rows leave, as the decode loops do
    kept = layer.keys.clone()
    step = torch.randn(2, 2, 1, 4)
    keys, _ = layer.update(step, step)
    assert torch.equal(keys, torch.cat([kept, step], dim=-2))


def test_a_model_decodes_the_same_logits_on_either_cache(tmp_path):
    model = load_causal_lm(toy_model_folder(tmp_path / "model")).eval()
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = []
    for cache in (DynamicCache(config=model.config), roomy_cache(model.config)):
        step, seen = ids, []
        with torch.no_grad():
            for _ in range(5):
                out = model(input_ids=step, past_key_values=cache).logits[:, -1]
                seen.append(out)
                step = out.argmax(-1, keepdim=True)
        logits.append(torch.stack(seen))
    assert all(type(layer) is RoomyLayer for layer in cache.layers)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)


def test_reserve_makes_room_for_tokens_written_later_and_keeps_what_is_cached():
    layer = RoomyLayer()
    first = torch.randn(2, 3, 5, 4)
    keys, _ = layer.update(first, first + 1)
    room = keys.data_ptr()
    for n in range(1, ROOM + 2):
        keys, values = layer.reserve(1)
        assert keys.shape == (2, 3, 5 + n, 4) and values.shape == keys.shape and keys.stride() == values.stride()
        assert (keys.data_ptr() == room) == (n <= ROOM)  # in place until the room is full, then moved once
        keys[:, :, -1], values[:, :, -1] = float(n), -float(n)  # as the decode layer kernel writes them
    assert torch.equal(layer.keys[:, :, :5], first) and torch.equal(layer.values[:, :, :5], first + 1)
    steps = torch.arange(1, ROOM + 2, dtype=torch.float32)
    assert torch.equal(layer.keys[0, 0, 5:, 0], steps) and torch.equal(layer.values[1, 2, 5:, 3], -steps)


def filled(rows: int, tokens: int, layer: DynamicLayer | None = None) -> DynamicLayer:
    layer = RoomyLayer() if layer is None else layer
    states = torch.randn(rows, 2, tokens, 4)
    layer.update(states, -states)
    return layer


def a_cache(layers: list[DynamicLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


def test_rows_leave_in_place_and_the_next_steps_append_in_place():
    layers = [filled(5, 3), filled(5, 3, DynamicLayer())]
    before = [layer.keys.clone() for layer in layers]
    room = layers[0].keys.untyped_storage().data_ptr()
    order = keep_rows(a_cache(layers), [0, 1, 3, 4])
    assert order == [0, 1, 4, 3]  # row 4 takes row 2's place; the others stay
    for layer, keys in zip(layers, before):
        assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, -keys[order])
    assert layers[0].keys.untyped_storage().data_ptr() == room  # moved within the room
    step = torch.randn(4, 2, 1, 4)
    keys, values = layers[0].update(step, -step)
    assert keys.untyped_storage().data_ptr() == room  # appended in place, not copied into fresh room
    assert torch.equal(keys, torch.cat([before[0][order], step], dim=-2)) and torch.equal(values, -keys)
    assert keep_rows(a_cache([filled(3, 2)]), [2]) == [2]  # a kept row from past the end fills the first place


def test_leading_tokens_cut_away_still_append_in_place():
    layer = filled(2, 6)
    kept = layer.keys[:, :, 2:].clone()
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]  # as rows leaving cut the columns
    room = layer.keys.untyped_storage().data_ptr()
    step = torch.randn(2, 2, 1, 4)
    keys, values = layer.update(step, -step)
    assert keys.untyped_storage().data_ptr() == room
    assert torch.equal(keys, torch.cat([kept, step], dim=-2)) and torch.equal(values, -keys)


def test_joining_rows_take_the_rooms_spare_rows_and_left_pad_with_zeros():
    layer, joiners = filled(3, 5), filled(2, 5)
    join_rows(layer, joiners, 5)  # no spare rows yet: all copied once into fresh room, with spare rows
    assert layer._rooms[0].shape[0] == 5 + SPARE_ROWS and layer.keys.shape == (5, 2, 5, 4)
    running, room = layer.keys.clone(), layer.keys.untyped_storage().data_ptr()
    short = filled(2, 3)
    join_rows(layer, short, 5)
    assert layer.keys.untyped_storage().data_ptr() == room  # into the spare rows: the running rows stay put
    padded = torch.cat([torch.zeros(2, 2, 2, 4), short.keys], dim=-2)
    assert torch.equal(layer.keys, torch.cat([running, padded])) and torch.equal(layer.values, -layer.keys)
    long = filled(1, 8)
    join_rows(layer, long, 8)  # a longer joiner: every row padded to its width, in fresh room
    assert layer.keys.untyped_storage().data_ptr() != room and layer.keys.shape == (8, 2, 8, 4)
    assert torch.equal(layer.keys[:7, :, :3], torch.zeros(7, 2, 3, 4)) and torch.equal(layer.keys[7], long.keys[0])
    assert torch.equal(layer.keys[:5, :, 3:], running) and torch.equal(layer.values, -layer.keys)
    step = torch.randn(8, 2, 1, 4)
    keys, _ = layer.update(step, -step)  # the next step appends in place
    assert keys.untyped_storage().data_ptr() == layer._rooms[0].untyped_storage().data_ptr()
    plain, plain_joiners = filled(2, 3, DynamicLayer()), filled(1, 4, DynamicLayer())
    expected = torch.cat([torch.cat([torch.zeros(2, 2, 1, 4), plain.keys], dim=-2), plain_joiners.keys])
    join_rows(plain, plain_joiners, 4)  # another kind of layer: concatenated
    assert torch.equal(plain.keys, expected) and torch.equal(plain.values, -expected)
