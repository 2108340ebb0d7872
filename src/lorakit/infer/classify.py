"""Classification with confidences: the label and its softmax probability for each text."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def classify(
    model: nn.Module, tokenizer, texts: list[str], labels: list[str], max_length: int = 128, batch_size: int = 32
) -> list[dict]:
    """[{label, probability, probabilities}] for each text, in order (dynamic padding per batch)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[dict] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        probs = model(**enc).logits.float().softmax(-1)  # (B, classes)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": labels[best], "probability": row[best], "probabilities": dict(zip(labels, row))})
    return out
