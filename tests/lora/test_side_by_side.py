"""lora/side_by_side.py: a sibling group's side-by-side factors, and when kept ones still hold."""

from __future__ import annotations

import gc

import torch

import lorakit
from lorakit.lora.side_by_side import UNCOVERED, KeptFactors, side_by_side_entries
from conftest import perturb, tiny_llama


def attention_group():
    """q/k/v of a tiny model's first layer with adapters a (r=2) and b (r=4), and (slot, adapter) per member."""
    model = tiny_llama()
    for name, r in (("a", 2), ("b", 4)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj"]),
                       name)
        perturb(model, name, std=0.1, seed=r)
    attention = model.model.layers[0].self_attn
    group = [attention.q_proj, attention.k_proj, attention.v_proj]
    present = [[(1, m.adapters["a"]), (2, m.adapters["b"])] for m in group]
    return model, group, present


def test_entries_hold_each_members_scaled_B_beside_the_groups_A():
    _, group, present = attention_group()
    found = [[(k, adapter.row_factors(m)) for k, adapter in f] for m, f in zip(group, present)]
    entries = side_by_side_entries(group, found)
    side, start, stop, B, _ = entries[id(group[1])]  # k_proj: after q_proj's 2 + 4 ranks
    assert (start, stop) == (6, 12) and side is entries[id(group[0])][0]
    k = group[1]
    expected_A = torch.cat([k.adapters["a"].A, k.adapters["b"].A])
    a, b = k.adapters["a"], k.adapters["b"]
    expected_B = torch.cat([a.B * a.scaling, b.B * b.scaling], 1)
    assert torch.equal(side.A[start:stop], expected_A) and torch.allclose(B, expected_B)
    assert side.owner.tolist() == [1, 1, 2, 2, 2, 2] * 3


def test_an_output_scale_leaves_the_group_uncovered():
    _, group, present = attention_group()
    found = [[(k, (A, B, s, torch.ones(B.shape[0]))) for k, (A, B, s, _) in
              [(k, adapter.row_factors(m)) for k, adapter in f]] for m, f in zip(group, present)]
    assert set(side_by_side_entries(group, found).values()) == {UNCOVERED}


def test_kept_factors_hold_until_what_they_were_built_from_changes():
    _, group, present = attention_group()

    def kept():
        return KeptFactors(present, {}, ("a", "b"))

    assert kept().holds(present)
    factors = kept()
    with torch.no_grad():
        group[2].adapters["b"].B.add_(1.0)  # trained in place: a new version
    assert not factors.holds(present)
    factors = kept()
    group[0].adapters["a"].scaling = 0.5
    assert not factors.holds(present)
    factors = kept()
    group[1].adapters["a"].A.data = group[1].adapters["a"].A.data.clone()  # the same parameter, other storage
    assert not factors.holds(present)
    factors = kept()
    assert not factors.holds([list(reversed(f)) for f in present])  # the slots given to other adapters


def test_kept_factors_never_hold_once_an_adapter_they_watched_is_freed():
    model, group, present = attention_group()
    factors = KeptFactors(present, {}, ("a", "b"))
    del present
    lorakit.delete_adapter(model, "b")
    gc.collect()
    assert factors.freed
    assert not factors.holds([[(1, m.adapters["a"])] for m in group])
