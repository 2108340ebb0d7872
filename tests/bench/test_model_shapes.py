"""bench/model_shapes.py: published shapes built with seeded random weights."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the benches import their helpers as sibling modules, as `python bench/x.py` does
model_shapes = importlib.import_module("model_shapes")


def test_smollm2_shape_matches_the_shipped_model_and_its_seed_repeats():
    shipped = model_shapes.base_model("smollm2-135m-instruct")  # no shape: the shipped weights
    built, again = model_shapes.random_model("smollm2-135m"), model_shapes.random_model("smollm2-135m")
    shapes = {name: p.shape for name, p in shipped.named_parameters()}
    assert {name: p.shape for name, p in built.named_parameters()} == shapes
    assert not built.training
    for (name, a), (_, b) in zip(built.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(built.model.layers[0].mlp.up_proj.weight, shipped.model.layers[0].mlp.up_proj.weight)

