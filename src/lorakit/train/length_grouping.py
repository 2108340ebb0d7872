"""Length-grouped sampling: batches of similar lengths, so padding (or packing slack) stays small.

As transformers' `group_by_length`: the shuffled epoch order is cut into mega-batches of
`MEGA_BATCHES` batches, each sorted by length and cut into batches; the batches of a
mega-batch are then shuffled, so lengths do not trend within the epoch. The result is still a
fixed function of (order, seed), which exact resume needs.
"""

from __future__ import annotations

import torch

MEGA_BATCHES = 50


def length_grouped(order: list[int], lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A permutation of `order` whose consecutive `batch_size` slices hold similar lengths."""
    generator = torch.Generator().manual_seed(seed)
    span = MEGA_BATCHES * batch_size
    out: list[int] = []
    for start in range(0, len(order), span):
        mega = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            out.extend(batches[b])
    return out
