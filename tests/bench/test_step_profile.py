"""The step profile's kinds of work: each op put where it belongs, and a real profiled step's time split among them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
step_profile = importlib.import_module("step_profile")


def test_each_op_is_put_in_its_kind_by_name_and_shapes():
    kind = step_profile.kind_of
    assert kind("aten::mm", [[400, 576], [576, 3072]], vocab=1000) == "frozen GEMMs"
    assert kind("aten::mm", [[400, 576], [576, 1000]], vocab=1000) == "head GEMMs"
    assert kind("aten::mm", [[400, 1536], [1536, 8]], vocab=1000) == "LoRA products"
    assert kind("aten::addmm_", [[400, 576], [400, 24], [24, 576], [], []], vocab=1000) == "LoRA products"
    assert kind("aten::_scaled_dot_product_flash_attention_for_cpu", [], vocab=1000) == "attention"
    assert kind("aten::_to_copy", [[4, 4]], vocab=1000) == "casts and copies"
    assert kind("aten::silu_backward", [[4, 4]], vocab=1000) == "elementwise"
    assert kind("aten::mul_", [[4, 4]], vocab=1000) == "elementwise"
    assert kind("Optimizer.step#AdamW.step", [], vocab=1000) == "optimizer"
    assert kind("aten::view", [[4, 4]], vocab=1000) == "other"


def test_a_profiled_step_splits_its_time_among_the_kinds():
    x, w, head = torch.randn(256, 128), torch.randn(128, 128), torch.randn(128, 997)
    a, b = torch.randn(128, 8), torch.randn(8, 128)

    def run_step(_: int) -> None:
        y = x @ w + (x @ a) @ b
        (y.relu() @ head).float().sum()

    ms = step_profile.step_profile(run_step, [0, 1], vocab=997)
    assert list(ms) == list(step_profile.KINDS)
    assert ms["frozen GEMMs"] > 0 and ms["head GEMMs"] > 0 and ms["LoRA products"] > 0 and ms["elementwise"] > 0
    assert ms["attention"] == 0 and ms["optimizer"] == 0


def test_profile_notes_give_each_profiled_variant_its_median_time_by_kind_largest_first():
    runs = [{"variant": "h", "profile_ms_per_step": {"frozen GEMMs": t, "other": 10.0}} for t in (100.0, 300.0, 200.0)]
    runs.append({"variant": "b"})  # not profiled: no line
    (line,) = step_profile.profile_notes(runs)
    assert line.startswith("h: ") and "median of 3 rounds" in line
    assert line.endswith("210 ms: frozen GEMMs 200 ms (95%), other 10 ms (5%)")
