"""lora/mixed_downs.py: both layouts of a mixed batch's x A^T give each row its own adapter's term."""

from __future__ import annotations

import pytest
import torch

from lorakit.lora.mixed_downs import RowDown, StackedDown

IN, OUT, T = 6, 5, 3
RANKS = {1: 2, 2: 3}  # slot -> rank; slot 0: no adapter


def factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {slot: (torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)) for slot, r in RANKS.items()}


def expected(x, out, slots, found):
    rows = [out[b] + (x[b] @ found[s][0].T @ found[s][1].T if s else 0) for b, s in enumerate(slots)]
    return torch.stack(rows)


@pytest.mark.parametrize("grad", [False, True])
def test_both_layouts_add_each_rows_own_term(grad):
    found, slots = factors(), [1, 0, 2, 1]
    x, out = torch.randn(len(slots), T, IN), torch.randn(len(slots), T, OUT)
    want = expected(x, out, slots, found)
    # stacked: the adapters side by side, owner says each column's slot
    A = torch.cat([found[s][0].T for s in RANKS], dim=1)
    B = torch.cat([found[s][1].T for s in RANKS])
    owner = torch.tensor([s for s, r in RANKS.items() for _ in range(r)])
    # gathered: each row's copy, ranks padded with zeros to the widest
    width = max(RANKS.values())
    A_rows = torch.zeros(len(slots), IN, width)
    B_rows = torch.zeros(len(slots), width, OUT)
    for b, s in enumerate(slots):
        if s:
            A_rows[b, :, : RANKS[s]], B_rows[b, : RANKS[s]] = found[s][0].T, found[s][1].T
    with torch.set_grad_enabled(grad):
        stacked = StackedDown(A, owner, torch.tensor(slots)).add(out.clone(), x, 0, A.shape[1], B)
        gathered = RowDown(A_rows).add(out.clone(), x, 0, width, B_rows)
    torch.testing.assert_close(stacked, want)
    torch.testing.assert_close(gathered, want)


def test_siblings_slice_one_product_and_rows_leave():
    found, slots = factors(1), [2, 1, 1]
    x = torch.randn(len(slots), T, IN)
    A = torch.cat([found[s][0].T for s in RANKS], dim=1)
    down = StackedDown(A, torch.tensor([s for s, r in RANKS.items() for _ in range(r)]), torch.tensor(slots))
    whole = down.of(x, 0, A.shape[1])
    assert down.of(x, 0, 2).data_ptr() == whole.data_ptr()  # a sibling's columns: a slice, not a new product
    keep = torch.tensor([2, 0])
    down.select(keep)
    kept = down.of(x[keep], 0, A.shape[1]).view(2, T, -1)
    # now row 0 is the old row 2 (slot 1: columns 0:2), row 1 the old row 0 (slot 2: columns 2:5)
    assert kept[0, :, :2].abs().sum() > 0 and torch.equal(kept[0, :, 2:], torch.zeros(T, 3))
    assert torch.equal(kept[1, :, :2], torch.zeros(T, 2)) and kept[1, :, 2:].abs().sum() > 0
