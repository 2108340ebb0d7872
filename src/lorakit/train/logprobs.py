"""Per-token log-probabilities of the labelled tokens, for objectives that need more than one summed loss.

Preference objectives compare whole sequences: they need log p(token) at every labelled position,
summed per row, not one cross-entropy summed over the batch. As in ``lorakit.train.loss``, the
trunk runs once and the head is applied to the wanted positions only, in chunks, so no
(tokens x vocab) tensor is ever built whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train.loss import CHUNK_ROWS, PLAIN_HEAD_TYPES


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], wanted: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every position where `wanted` (B, T-1) is True; 0 elsewhere.

    Position t of the result scores `input_ids[:, t + 1]` given the tokens up to t, so `wanted` is
    aligned with the shifted targets (e.g. `labels[:, 1:] != -100`).

    Returns:
        (B, T-1) float32 log-probabilities, differentiable with respect to the model.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False
    targets = batch["input_ids"][:, 1:]  # (B, T-1)
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V): softcapped or scaled heads
        picked = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked * wanted
    hidden = model.base_model(**inputs).last_hidden_state[:, :-1]  # (B, T-1, d)
    rows, row_targets = hidden[wanted], targets[wanted]  # (N, d), (N,)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad:
        values = HeadLogProbs.apply(rows, head.weight, row_targets)
    else:  # a trained (LoRA-wrapped) head: plain autograd, chunk by chunk
        values = torch.cat([
            -F.cross_entropy(head(rows[s : s + CHUNK_ROWS]).float(), row_targets[s : s + CHUNK_ROWS], reduction="none")
            for s in range(0, rows.shape[0], CHUNK_ROWS)
        ]) if rows.shape[0] else rows.new_zeros(0, dtype=torch.float32)
    out = hidden.new_zeros(wanted.shape, dtype=torch.float32)
    return out.masked_scatter(wanted, values)


class HeadLogProbs(torch.autograd.Function):
    """log softmax(W h_i)[t_i] for every row i, for a frozen head W; dL/dh_i is kept, the logits are not.

    d log p_i / d h_i = (onehot(t_i) - softmax(W h_i)) W, computed chunk by chunk in forward; backward
    scales each row's by its incoming gradient.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets):
        out = rows.new_empty(rows.shape[0], dtype=torch.float32)
        want_grad = ctx.needs_input_grad[0]
        grad_rows = torch.empty_like(rows) if want_grad else None
        weight = weight.float()  # once, not per chunk (a copy only for a half-precision head)
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk, chunk_targets = rows[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
            logits = chunk.float() @ weight.T  # (chunk, V)
            log_probs = logits.log_softmax(-1)
            out[start : start + CHUNK_ROWS] = log_probs.gather(1, chunk_targets[:, None]).squeeze(1)
            if want_grad:
                probs = log_probs.exp_()
                probs[torch.arange(len(chunk_targets)), chunk_targets] -= 1  # softmax - onehot = -d log p / d logits
                grad_rows[start : start + CHUNK_ROWS] = (-(probs @ weight)).to(rows.dtype)
        ctx.save_for_backward(grad_rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad[:, None].to(grad_rows.dtype), None, None
