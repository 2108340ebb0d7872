"""RoomyLayer: each step's keys and values are written into spare room, not concatenated; what
attention sees and what the model generates equal transformers' DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from conftest import toy_model_folder
from lorakit.infer.kv_cache import ROOM, RoomyLayer, roomy_cache
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
