"""Preference objectives: DPO (sigmoid or IPO, with the RPO term) and ORPO, in the one training loop.

A batch is B (chosen, rejected) pairs as 2B rows (``lorakit.data.preference.collate_pairs``); one
forward of the policy gives every row's summed log-probability of its reply, log pi(y|x):

    DPO     h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
            sigmoid  -log sigmoid(beta h)                              (Rafailov et al., 2023)
            ipo      (h' - 1 / (2 beta))^2, h' with each log-ratio divided by its reply's tokens
            rpo      + rpo_alpha x the chosen replies' mean token NLL (Pang et al., 2024)
    ORPO    NLL(chosen) - lambda log sigmoid(log odds(y_w|x) - log odds(y_l|x)),
            odds(y|x) = p / (1 - p) with p the per-token mean log-probability, exponentiated
            (Hong et al., 2024); the NLL is over the prompt and the reply unless orpo_prompt_loss is false

The reference (``lorakit.train.reference``) is the model as preference training began, with no
second model in memory. Conventions follow TRL's trainers (their parity tests are in
tests/train/test_preference_trl.py): summed log-probs, the pair mean of the loss, the NLL terms
as token means over a micro-batch, rewards = beta x log-ratio (DPO) or beta x mean log-prob (ORPO).
The loop divides a micro-batch's loss sum by the pairs in the step, so `loss_sum` returns
B x (the micro-batch's mean loss).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import PreferenceConfig
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.preference import collate_pairs
from lorakit.train.distributed import all_reduce_sum
from lorakit.train.logprobs import token_logps
from lorakit.train.reference import Reference


class PreferenceObjective:
    """What DPO and ORPO share: batches of pairs, one policy forward, metrics summed over pairs."""

    best_metric = "eval_loss"
    needs_reference = False

    def __init__(self, pad_token_id: int, config: PreferenceConfig | None = None, reference: Reference | None = None):
        self.pad_token_id, self.config = pad_token_id, config or PreferenceConfig()
        self.reference = reference or Reference("base")
        self._sums: dict[str, float] = defaultdict(float)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        done = batch["labels"][:, 1:] != IGNORE_INDEX  # (2B, T-1): reply tokens
        real = batch["attention_mask"][:, 1:].bool()  # (2B, T-1): prompt and reply tokens
        wanted = done | (real & self._nll_rows(done.shape[0], real.device)[:, None])
        logps = token_logps(model, batch, wanted)  # (2B, T-1)
        losses, metrics = self.pair_losses(model, batch, logps, done, real)  # (B,), {name: (B,)}
        pairs = losses.shape[0]
        self._sums["pairs"] += pairs
        for name, values in metrics.items():
            self._sums[name] += float(values.detach().sum())
        return losses.sum()

    def _nll_rows(self, rows: int, device) -> torch.Tensor:
        """(2B,) rows whose every real token needs a log-prob beyond the reply (ORPO's prompt NLL)."""
        return torch.zeros(rows, dtype=torch.bool, device=device)

    def pair_losses(self, model, batch, logps, done, real) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train_metrics(self) -> dict:
        """Means per pair since the last call: reward accuracy and margin, chosen/rejected log-probs, ..."""
        names = sorted(k for k in self._sums if k != "pairs")
        pairs, *values = all_reduce_sum(self._sums["pairs"], *(self._sums[k] for k in names))
        self._sums = defaultdict(float)
        return {name: value / pairs for name, value in zip(names, values)} if pairs else {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], batch_size: int, device) -> dict:
        kept, self._sums = self._sums, defaultdict(float)  # training metrics of the current window stay apart
        total = 0.0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[start : start + batch_size]).items()}
            total += float(self.loss_sum(model, batch))
        total, pairs = all_reduce_sum(total, self._sums["pairs"])  # each process evaluated its shard
        metrics = self.train_metrics()
        self._sums = kept
        return {"eval_loss": total / max(pairs, 1), **{f"eval_{k}": v for k, v in metrics.items()}}


def sequence_logps(logps: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's reply (2B,), its token count (2B,))."""
    return (logps * done).sum(-1), done.sum(-1)


class DPOObjective(PreferenceObjective):
    """Direct preference optimisation against the reference (sigmoid or IPO loss, optional RPO term)."""

    needs_reference = True

    def pair_losses(self, model, batch, logps, done, real):
        beta, pairs = self.config.beta, done.shape[0] // 2
        policy, lengths = sequence_logps(logps, done)
        ref = batch["ref_logps"] if "ref_logps" in batch else self.reference.logps(model, batch)
        chosen_ratio, rejected_ratio = (policy - ref.to(policy.dtype)).chunk(2)
        if self.config.loss_type == "ipo":
            chosen_len, rejected_len = lengths.chunk(2)
            delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        metrics = _reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), policy.detach())
        if self.config.rpo_alpha is not None:
            nll = -logps[:pairs][done[:pairs]].mean()  # the chosen replies' mean token NLL, as TRL's "sft" loss
            losses = losses + self.config.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach().expand(pairs)
        return losses, metrics


class ORPOObjective(PreferenceObjective):
    """Odds-ratio preference optimisation: NLL on the chosen plus an odds-ratio term; no reference."""

    def _nll_rows(self, rows: int, device) -> torch.Tensor:
        wanted = torch.zeros(rows, dtype=torch.bool, device=device)
        wanted[: rows // 2] = self.config.orpo_prompt_loss
        return wanted

    def pair_losses(self, model, batch, logps, done, real):
        beta, pairs = self.config.beta, done.shape[0] // 2
        summed, lengths = sequence_logps(logps, done)
        mean = summed / lengths.clamp(min=1)  # (2B,): per-token mean log-prob of each reply
        chosen, rejected = mean.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)  # (B,)
        nll_mask = real[:pairs] if self.config.orpo_prompt_loss else done[:pairs]
        nll = -logps[:pairs][nll_mask].mean()
        losses = nll - beta * ratio
        metrics = _reward_metrics(beta * chosen.detach(), beta * rejected.detach(), mean.detach())
        metrics.update(nll_loss=nll.detach().expand(pairs), log_odds_ratio=ratio.detach(),
                       log_odds_chosen=log_odds.detach())
        return losses, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_logps, rejected_logps = logps.chunk(2)
    return {
        "reward_accuracy": (chosen > rejected).float(),
        "reward_margin": chosen - rejected,
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "logp_chosen": chosen_logps,
        "logp_rejected": rejected_logps,
    }
