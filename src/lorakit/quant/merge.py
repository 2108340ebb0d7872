"""Merge an adapter trained on a quantised base, and measure how far the merged model moves.

The complaint this answers: an adapter trained on a 4-bit base, merged into the fp16/fp32 base and
saved, no longer behaves like the adapter did in training, because the base it now sits on is W,
not deq(Q(W)). lorakit merges into deq(Q(W)) in fp32 (what the adapter learned against) and reports
the logit gap to the adapter on the quantised base; merging into the original full-precision W is
offered too, with its gap, for users who want the unquantised base back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.lora.merge import merge_and_unload

# A few short prompts of different kinds; the gap is measured at every position of each.
GAP_PROMPTS = [
    "Turn left 45 degrees and then move forward 2 meters.",
    "### Instruction:\nStop the robot.\n\n### Command:\n",
    "The capital of France is",
    "def fibonacci(n):",
]


@dataclass
class LogitGap:
    """How far one model's next-token logits are from a reference's, over the prompts' positions."""

    label: str
    max_abs: float
    mean_abs: float
    top1_agreement: float  # share of positions whose most likely next token is the same

    def line(self) -> str:
        return (
            f"{self.label}: max |logit diff| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, "
            f"same top-1 token at {self.top1_agreement:.1%} of positions"
        )


@torch.no_grad()
def prompt_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Float32 logits of each tokenised prompt (one at a time, so no padding enters)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu() for b in batches]


def logit_gap(label: str, reference: list[torch.Tensor], other: list[torch.Tensor]) -> LogitGap:
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    same = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, other)])
    return LogitGap(label, diff.max().item(), diff.mean().item(), same.float().mean().item())


def merge_with_report(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    full_precision: Callable[[], nn.Module] | None = None,
) -> tuple[nn.Module, list[LogitGap]]:
    """Merge `model` (adapter on a quantised base) in fp32; measure the gap; optionally merge into W.

    Args:
        model: a model with its adapter loaded on a quantised base (a full-precision one works too).
        batches: tokenised prompts (`input_ids`, `attention_mask`), one per dict.
        full_precision: builds the same adapter on the original full-precision base; when given,
            its merge is returned instead, and its gap is reported as well.

    Returns:
        (the merged plain model to save, the gaps to the adapter-on-quantised-base logits).
    """
    reference = prompt_logits(model, batches)
    merged = merge_and_unload(model)  # dequantises, then folds B A into deq(Q(W)) in fp32
    gaps = [logit_gap("merged into the dequantised base", reference, prompt_logits(merged, batches))]
    if full_precision is None:
        return merged, gaps
    del merged, model
    merged = merge_and_unload(full_precision())
    gaps.append(logit_gap("merged into the full-precision base", reference, prompt_logits(merged, batches)))
    return merged, gaps
