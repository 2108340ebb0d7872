"""Score an adapter by generating responses for held-out records and comparing them to the references."""

from __future__ import annotations

from torch import nn

from lorakit.config import EvalConfig
from lorakit.infer.generate import GenerationConfig, generate


def task_scorer(task: str | None):
    """The task's `score(preds, refs) -> dict` function, or an exact-match-only default."""
    if task == "ros2":
        from lorakit.tasks import ros2

        return ros2.score
    return lambda preds, refs: {"exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)}


def score_generations(model: nn.Module, tokenizer, records: list[dict], template, config: EvalConfig) -> dict:
    """Greedy-generate a response for each record; return the task's scores and a few samples."""
    pairs = [template.render(r) for r in records]
    prompts, refs = [p for p, _ in pairs], [ref for _, ref in pairs]
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        add_special_tokens=not getattr(template, "special_tokens_in_prompt", False),
    )
    preds = generate(model, tokenizer, prompts, generation)
    scores = task_scorer(config.task)(preds, refs)
    samples = [
        {"instruction": r.get("instruction", prompts[i]), "reference": refs[i], "prediction": preds[i]}
        for i, r in enumerate(records[: config.samples])
    ]
    return {**scores, "samples": samples}
