"""Causal-LM loss computed only where there are labels.

The output head turns each hidden state into vocab-sized logits; for instruction tuning most
positions (the prompt, the padding) carry no label, so their logits are wasted. We run the
trunk, pick the hidden states whose *next* token is labelled, and apply the head and the
cross-entropy to those rows only, in chunks, so a (tokens x vocab) tensor is never built whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.masking import IGNORE_INDEX
from lorakit.train.half_base import half_head_weight

# Families whose logits are exactly head(trunk(x)): no softcapping or logit scaling to reproduce.
PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2", "smollm3", "phi3"}
CHUNK_ROWS = 256


def label_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a label after the one-position shift of causal LM."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over labelled positions of `batch`.

    Summing lets the caller divide by the label count of a whole accumulation window, so every
    token weighs the same however the tokens fall into micro-batches.
    """
    labels = batch["labels"]
    model_inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    model_inputs["use_cache"] = False  # a cache would also switch off transformers' packed-sequence masking
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        logits = model(**model_inputs).logits[:, :-1]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    hidden = model.base_model(**model_inputs).last_hidden_state[:, :-1]  # (B, T-1, d)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, row_targets = hidden[keep], targets[keep]  # (N, d), (N,)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad:
        return HeadCrossEntropy.apply(rows, half_head_weight(head), row_targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        logits = head(rows[start : start + CHUNK_ROWS]).float()  # (chunk, vocab)
        total = total + F.cross_entropy(logits, row_targets[start : start + CHUNK_ROWS], reduction="sum")
    return total


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i, t_i) for a frozen head W, with dL/dh computed chunk by chunk in forward.

    Autograd through the head would keep every chunk's (rows x vocab) logits and softmax until
    backward; here each chunk's logits live only inside the loop, and what is kept is dL/dh,
    the size of the hidden states:  dL/dh_i = (softmax(W h_i) - onehot(t_i)) W.

    A head weight in a half type below the rows' (train.half_base's copy) multiplies both products in that
    type, accumulating in fp32 inside; the softmax and the loss stay fp32.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets):
        total = rows.new_zeros((), dtype=torch.float32)
        want_grad = ctx.needs_input_grad[0]  # forward runs with grad mode off: ask autograd instead
        grad_rows = torch.empty_like(rows) if want_grad else None
        # One (chunk x vocab) buffer for every chunk, worked on in place: logits, then exp(logits - max),
        # then the softmax. Fresh tensors per chunk (logits, log-softmax, softmax) would each be tens of
        # MB, which the allocator maps and the OS faults in anew every time.
        buffer = rows.new_empty((min(CHUNK_ROWS, rows.shape[0]), weight.shape[0]), dtype=torch.float32)
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk, chunk_targets = rows[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
            logits = buffer[: len(chunk_targets)]
            if chunk.dtype == weight.dtype == torch.float32:
                torch.mm(chunk, weight.T, out=logits)
            else:
                logits.copy_(chunk.to(weight.dtype) @ weight.T)
            picked = logits.gather(1, chunk_targets[:, None])  # (chunk, 1): each row's target logit
            top = logits.amax(-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(-1, keepdim=True)  # logits now hold exp(logit - max)
            total += (sums.log() + top - picked).sum()  # log-sum-exp minus the target logit
            if want_grad:
                probs = logits.div_(sums)
                probs[torch.arange(len(chunk_targets)), chunk_targets] -= 1
                grad_rows[start : start + CHUNK_ROWS] = _rows_times(probs, weight, rows.dtype)
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad.to(grad_rows.dtype), None, None


def _rows_times(probs: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """probs W in `dtype`: in W's half type where it is narrower than `dtype` (a half copy of an fp32 model's head),
    else in fp32 (a half model's own head)."""
    if weight.dtype != dtype and dtype == torch.float32:
        return (probs.to(weight.dtype) @ weight).to(dtype)
    return (probs @ weight.float()).to(dtype)
