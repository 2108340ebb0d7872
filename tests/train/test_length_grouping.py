"""Length-grouped sampling: a permutation, batches of similar length, a fixed function of the seed."""

from __future__ import annotations

import random

from lorakit.train.length_grouping import length_grouped


def test_length_grouped_is_a_permutation_with_tight_batches():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    grouped = length_grouped(order, lengths, batch_size=8, seed=1)
    assert sorted(grouped) == list(range(1000))

    def spread(o):  # mean (max - min) length within a batch
        batches = [o[i : i + 8] for i in range(0, len(o), 8)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(grouped) < spread(order) / 10
    assert grouped == length_grouped(order, lengths, 8, seed=1)
    assert grouped != length_grouped(order, lengths, 8, seed=2)


def test_batches_group_by_length_covers_each_epoch_once():
    from lorakit.train.sampling import Batches

    examples = [{"input_ids": [0] * n} for n in [3, 90, 4, 88, 5, 91, 2, 87]]
    batches = Batches(examples, 2, 1, lambda b: [len(e["input_ids"]) for e in b], seed=0, group_by_length=True)
    epoch = [batch for i in range(batches.steps_per_epoch) for batch, _weight in batches[i]]
    assert sorted(n for b in epoch for n in b) == sorted(len(e["input_ids"]) for e in examples)
    assert all(max(b) - min(b) <= 3 for b in epoch)  # short with short, long with long
