"""Where a training step's time goes: torch.profiler's self-CPU time per op, put into a few kinds of work.

    profile = step_profile(run_step, steps=[2, 3, 4], vocab=49152)   # {kind: ms per step}
    lines = profile_notes(runs)   # a bench's runs carrying "profile_ms_per_step": one line per variant

The kinds, by op name and operand shapes:
  frozen GEMMs       matrix products whose every dimension exceeds RANK_WIDTH (the base's projections)
  head GEMMs         matrix products with the vocabulary as a dimension (the loss's head)
  LoRA products      matrix products with a dimension of at most RANK_WIDTH (x A^T, u B^T and their gradients)
  attention          scaled dot-product attention, forward and backward
  casts and copies   dtype casts, copies, concatenations
  elementwise        arithmetic, activations, reductions (norms, SwiGLU, rotary, the softmax of the loss)
  optimizer          AdamW's step and the gradient clipping's norms
  other              everything else: views, allocation, autograd and Python between the ops
Self time counts each microsecond once (an op's children are their own). The profiler itself slows the
step down (it records every op's shapes), so the kinds are shares of a profiled step, not a timing.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable

RANK_WIDTH = 64  # widest LoRA product dimension (a sibling group's concatenated ranks, r <= 16 each)
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_linear_pointwise",
         "mkldnn::_linear_pointwise"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat"}
ELEMENTWISE = {"mul", "add", "sub", "div", "silu", "silu_backward", "exp", "sum", "neg", "rsqrt", "pow", "mean",
               "amax", "log", "gather", "index", "index_put", "sigmoid", "where", "fill", "zero", "sqrt", "rsub",
               "masked_fill", "reciprocal"}
KINDS = ("frozen GEMMs", "head GEMMs", "LoRA products", "attention", "casts and copies", "elementwise", "optimizer",
         "other")


def kind_of(name: str, shapes: list, vocab: int) -> str:
    """The kind of work of one op, given its name and its operands' shapes."""
    if name in GEMMS:
        dims = [d for shape in shapes if shape for d in shape]
        if vocab in dims:
            return "head GEMMs"
        return "LoRA products" if dims and min(dims) <= RANK_WIDTH else "frozen GEMMs"
    if "scaled_dot_product" in name:
        return "attention"
    if name in CASTS:
        return "casts and copies"
    if "Optimizer" in name or name.startswith("aten::_foreach") or name in ("aten::addcmul_", "aten::addcdiv_",
                                                                            "aten::lerp_", "aten::_fused_adamw_"):
        return "optimizer"
    if name.startswith("aten::") and name.split("::", 1)[1].rstrip("_") in ELEMENTWISE:
        return "elementwise"
    return "other"


def step_profile(run_step: Callable[[int], None], steps: list[int], vocab: int) -> dict[str, float]:
    """{kind: ms of self-CPU time per step} over `run_step(i)` for each i in `steps`, every kind listed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in steps:
            run_step(i)
    totals = collections.Counter({kind: 0.0 for kind in KINDS})
    for event in prof.key_averages(group_by_input_shape=True):
        totals[kind_of(event.key, event.input_shapes or [], vocab)] += event.self_cpu_time_total / 1e3
    return {kind: totals[kind] / len(steps) for kind in KINDS}


def profile_notes(runs: list[dict]) -> list[str]:
    """One line per profiled variant: its profiled step's self-CPU time by kind (median over rounds), largest first."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in runs if "profile_ms_per_step" in r):
        profiles = [r["profile_ms_per_step"] for r in runs if r["variant"] == variant and "profile_ms_per_step" in r]
        ms = {kind: statistics.median(p[kind] for p in profiles) for kind in profiles[0]}
        total = sum(ms.values())
        largest_first = sorted(ms.items(), key=lambda kv: -kv[1])
        kinds = ", ".join(f"{kind} {t:.0f} ms ({t / total:.0%})" for kind, t in largest_first)
        lines.append(f"{variant}: where a profiled step's time went (self CPU under torch.profiler, which slows the "
                     f"step down; median of {len(profiles)} rounds; bench/step_profile.py): {total:.0f} ms: {kinds}")
    return lines
