"""What the loop optimises and measures, per task: causal LM, sequence classification, or preferences.

An objective turns examples into batches, gives the summed loss of a batch with the count it
sums over (label tokens, examples, or preference pairs), and evaluates a held-out set. The loop divides the loss
sums of an accumulation window by the window's total count. `OBJECTIVES` names them: a run
config's `task` is one of its keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.classification import pad_classification_batch
from lorakit.data.collate import pad_batch
from lorakit.data.packing import pack_batch
from lorakit.train.distributed import all_reduce_sum, all_reduce_tensor
from lorakit.train.loss import causal_lm_loss_sum, label_token_count
from lorakit.train.preference import DPOObjective, ORPOObjective


class CausalLMObjective:
    """Next-token cross-entropy on the response tokens."""

    best_metric = "eval_loss"

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.pad_token_id, self.pack_length = pad_token_id, pack_length

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack_length:
            return pack_batch(examples, self.pack_length, self.pad_token_id)
        return pad_batch(examples, self.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return label_token_count(batch["labels"])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch)

    def train_metrics(self) -> dict:
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], batch_size: int, device) -> dict:
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[start : start + batch_size]).items()}
            total += self.loss_sum(model, batch).item()
            count += self.count(batch)
        total, count = all_reduce_sum(total, count)  # each process evaluated its shard
        return {"eval_loss": total / max(count, 1)}


class ClassificationObjective:
    """Cross-entropy over the classes of each example; accuracy, macro-F1, confusion matrix."""

    best_metric = "eval_accuracy"

    def __init__(self, pad_token_id: int, num_labels: int):
        self.pad_token_id, self.num_labels = pad_token_id, num_labels
        self._correct = self._seen = 0

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_classification_batch(examples, self.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # (B, classes)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(model, batch)
        self._correct += int((logits.argmax(-1) == batch["labels"]).sum())
        self._seen += batch["labels"].shape[0]
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    def train_metrics(self) -> dict:
        """Training accuracy since the last call (the loop logs it with the loss)."""
        correct, seen = all_reduce_sum(self._correct, self._seen)
        out = {"accuracy": correct / seen} if seen else {}
        self._correct = self._seen = 0
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], batch_size: int, device) -> dict:
        confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long)  # (true, predicted)
        total = 0.0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[start : start + batch_size]).items()}
            logits = self._logits(model, batch)
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            for true, pred in zip(batch["labels"].tolist(), logits.argmax(-1).tolist()):
                confusion[true, pred] += 1
        (total,) = all_reduce_sum(total)  # each process evaluated its shard
        confusion = all_reduce_tensor(confusion)
        return {"eval_loss": total / max(int(confusion.sum()), 1), **classification_metrics(confusion)}


# RunConfig.task -> the objective it trains
OBJECTIVES = {"causal_lm": CausalLMObjective, "seq_cls": ClassificationObjective, "dpo": DPOObjective,
              "orpo": ORPOObjective}


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted)."""
    tp = confusion.diag().float()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    seen = (confusion.sum(0) + confusion.sum(1)) > 0  # a class neither labelled nor predicted is no class here,
    return {  # as scikit-learn's macro average leaves it out
        "eval_accuracy": (tp.sum() / confusion.sum().clamp(min=1)).item(),
        "eval_macro_f1": (f1[seen].mean() if seen.any() else f1.sum()).item(),
        "confusion": confusion.tolist(),
    }
