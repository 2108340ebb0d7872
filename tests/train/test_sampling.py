"""The sharded sampler: each global batch split across processes without overlap, packing included."""

from __future__ import annotations

import pytest

from lorakit.config import ConfigError, TrainConfig
from lorakit.data.packing import pack_batch
from lorakit.train.distributed import World, grad_accum_for
from lorakit.train.sampling import Batches, check_position

EXAMPLES = [{"input_ids": [3] * (2 + i % 5), "labels": [-100] + [4] * (1 + i % 5)} for i in range(29)]


@pytest.mark.parametrize("batch_size, accum, processes", [(2, 2, 2), (3, 1, 4), (1, 4, 3)])
def test_the_shares_of_the_processes_are_the_global_batch_of_one_process(batch_size, accum, processes):
    global_batch = batch_size * accum * processes
    one = Batches(EXAMPLES, global_batch, 1, list, seed=5)
    shards = [
        Batches(EXAMPLES, batch_size, accum, list, seed=5, world=World(r, processes))
        for r in range(processes)
    ]
    assert {s.steps_per_epoch for s in shards} == {one.steps_per_epoch} == {-(-29 // global_batch)}
    for step in range(3 * one.steps_per_epoch):  # three epochs, a short last step in each
        whole = one.ids(step)[0]
        parts = [i for s in shards for micro in s.ids(step) for i in micro]
        assert sorted(parts) == sorted(whole)  # nothing twice, nothing left out
        assert all(len(micro) <= batch_size for s in shards for micro in s.ids(step))
        assert len({len(s.ids(step)) for s in shards}) == 1  # every process runs the same micro-batch count


@pytest.mark.parametrize("batch_size, accum, processes", [(2, 2, 2), (3, 1, 4), (1, 4, 3)])
def test_length_grouped_steps_are_the_same_on_any_process_count(batch_size, accum, processes):
    """group_by_length groups by the global batch: a step holds the same examples on 1 process as on N, so a run (and
    a resume on another process count) neither repeats nor skips examples."""
    global_batch = batch_size * accum * processes
    one = Batches(EXAMPLES, batch_size, accum * processes, list, seed=5, group_by_length=True)
    shards = [Batches(EXAMPLES, batch_size, accum, list, seed=5, world=World(r, processes), group_by_length=True)
              for r in range(processes)]
    for step in range(3 * one.steps_per_epoch):
        whole = [i for micro in one.ids(step) for i in micro]
        assert sorted(i for s in shards for micro in s.ids(step) for i in micro) == sorted(whole), step
    lengths = [len(EXAMPLES[i]["input_ids"]) for i in one.ids(0)[0]]
    assert max(lengths) - min(lengths) <= 1 and global_batch <= len(EXAMPLES)  # grouped by length still


def test_a_process_with_nothing_in_a_micro_batch_gets_a_weightless_stand_in():
    shards = [Batches(EXAMPLES, 2, 1, list, seed=0, world=World(r, 2)) for r in range(2)]
    last = shards[0].steps_per_epoch - 1  # 29 = 7 x 4 + 1: one example for two processes
    (real,), (stand_in,) = shards[0][last], shards[1][last]
    assert real[1] == 1.0 and stand_in[1] == 0.0 and stand_in[0] == real[0]
    assert shards[1].ids(last) == [[]]


def test_each_process_packs_its_own_share():
    def collate(examples):
        return pack_batch(examples, 8, 0)

    shards = [Batches(EXAMPLES, 4, 1, collate, seed=1, world=World(r, 2)) for r in range(2)]
    whole = Batches(EXAMPLES, 8, 1, collate, seed=1)
    for step in range(whole.steps_per_epoch):
        labelled = sum(int((b["labels"] != -100).sum()) for s in shards for b, w in s[step] if w)
        assert labelled == sum(int((b["labels"] != -100).sum()) for b, _ in whole[step])


def test_global_batch_size_sets_the_accumulation_for_the_process_count():
    config = TrainConfig(batch_size=2, global_batch_size=8)
    assert [grad_accum_for(config, World(0, n)) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(
        ConfigError, match="train.global_batch_size: given 8, expected a multiple of batch_size 2 x 3"
    ):
        grad_accum_for(config, World(0, 3))
    with pytest.raises(ConfigError, match="train.grad_accum: given 3"):
        grad_accum_for(TrainConfig(batch_size=2, grad_accum=3, global_batch_size=8), World(0, 2))


def test_resume_under_another_global_batch_is_refused_with_the_fix():
    batches = Batches(EXAMPLES, 2, 1, list, seed=0)
    check_position({"global_batch": 2}, batches, "ckpt")
    check_position({}, batches, "ckpt")  # checkpoints written before global batches were recorded
    with pytest.raises(
        ConfigError, match="ckpt: written with a global batch of 4.*set --train.global_batch_size 4"
    ):
        check_position({"global_batch": 4, "processes": 2}, batches, "ckpt")
