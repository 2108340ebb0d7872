"""A serving model's weights moved onto transparent huge pages: one advised mapping, the same values and outputs,
tied tensors still tied, small tensors left where they are."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lorakit.infer import huge_pages
from lorakit.infer.huge_pages import move_to_huge_pages

pytestmark = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


def mapping_of(address: int) -> list[str]:
    """The /proc/self/smaps lines of the mapping holding `address`."""
    lines, inside = [], False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split()[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):
                low, high = (int(x, 16) for x in first.split("-"))
                inside = low <= address < high
            if inside:
                lines.append(line.strip())
    return lines


def test_weights_move_into_one_advised_mapping_with_the_same_values(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 2048)
    model = tiny_llama()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    small = model.model.norm.weight.data_ptr()
    moved = move_to_huge_pages(model)
    weights = [p for p in model.parameters() if p.numel() * p.element_size() >= 2048]
    assert moved == sum(p.numel() * p.element_size() for p in weights) > 0 and len(weights) > 10
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.model.norm.weight.data_ptr() == small
    lines = mapping_of(weights[0].data_ptr())
    assert all(mapping_of(p.data_ptr()) == lines for p in weights)  # one mapping
    flags = next(line for line in lines if line.startswith("VmFlags:")).split()
    assert "hg" in flags  # advised MADV_HUGEPAGE
    assert [p.data_ptr() for p in weights] == sorted(p.data_ptr() for p in weights)  # in the model's order
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_nothing_moves_when_switched_off(monkeypatch):
    monkeypatch.setenv("LORAKIT_HUGE_PAGES", "0")
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 2048)
    model = tiny_llama()
    address = model.lm_head.weight.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.lm_head.weight.data_ptr() == address
