"""Score an adapter by generating responses for held-out records and comparing them to the references."""

from __future__ import annotations

from torch import nn

from lorakit.config import EvalConfig
from lorakit.data.chat import to_messages
from lorakit.data.templates import ChatTemplate
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.tasks import task_scorer

__all__ = ["score_generations", "task_scorer"]


def score_generations(
    model: nn.Module, tokenizer, records: list[dict], template, config: EvalConfig, keep_rows: bool = False
) -> dict:
    """Greedy-generate a response for each record; return the task's scores and a few samples.

    For a multi-reference task (E2E: several references per meaning representation) each distinct
    prompt is generated once and scored against all of its records' references. Conversations are
    scored per assistant turn (see :func:`score_conversations`). With `keep_rows` the result also
    holds "rows": every prompt with its output and the scorer's verdict on it alone.
    """
    scorer = task_scorer(config.task)
    if any("messages" in r or "conversations" in r for r in records):
        return score_conversations(model, tokenizer, records, template, config, keep_rows)
    pairs = [template.render(r) for r in records]
    if getattr(scorer, "multi_reference", False):
        pairs, records = _group_by_prompt(pairs, records)
    prompts, refs = [p for p, _ in pairs], [ref for _, ref in pairs]
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        add_special_tokens=not getattr(template, "special_tokens_in_prompt", False),
    )
    preds = generate(model, tokenizer, prompts, generation)
    scores = scorer(preds, refs)
    samples = [
        {"instruction": r.get("instruction", prompts[i]), "reference": _first(refs[i]), "prediction": preds[i]}
        for i, r in enumerate(records[: config.samples])
    ]
    result = {**scores, "samples": samples}
    if keep_rows:
        result["rows"] = [
            {"instruction": r.get("instruction", prompts[i]), "prompt": prompts[i], "reference": refs[i],
             "prediction": preds[i], "scores": row_scores(scorer, preds[i], refs[i])}
            for i, r in enumerate(records)
        ]
    return result


def row_scores(scorer, prediction: str, reference) -> dict[str, float]:
    """The task scorer's numbers for one output alone (exact_match 0/1 for ros2; smoothed sentence BLEU for e2e, its
    `row` scorer)."""
    row = getattr(scorer, "row", None)
    scores = row(prediction, reference) if row is not None else scorer([prediction], [reference])
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def _group_by_prompt(pairs: list[tuple[str, str]], records: list[dict]) -> tuple[list, list[dict]]:
    """[(prompt, [every reference of that prompt])] in order of first appearance, and one record per prompt."""
    grouped: dict[str, list[str]] = {}
    first: dict[str, dict] = {}
    for (prompt, ref), record in zip(pairs, records):
        grouped.setdefault(prompt, []).append(ref)
        first.setdefault(prompt, record)
    return list(grouped.items()), list(first.values())


def _first(ref: str | list[str]) -> str:
    return ref if isinstance(ref, str) else ref[0]


def score_conversations(
    model: nn.Module, tokenizer, records: list[dict], template, config: EvalConfig, keep_rows: bool = False
) -> dict:
    """Score every assistant turn of every conversation, with the reference replies as the history.

    Returns the task's scores over all turns (``exact_match`` is per turn), ``exact_match_turn{k}``
    for the k-th assistant turn, and ``conversation_exact_match``: the share of conversations whose
    every turn is right. A conversation is all right with the reference history exactly when it is
    all right replying to its own earlier replies (they are then the references), so this is also
    the free-running score. With `keep_rows` the result holds one row per assistant turn.
    """
    chat = template if isinstance(template, ChatTemplate) else ChatTemplate(tokenizer)
    scorer = task_scorer(config.task)
    pairs, owner, position, asked = [], [], [], []
    for index, record in enumerate(records):
        turns = chat.render_turns(record)
        messages = to_messages(record)
        asked += [messages[i - 1]["content"] for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
        pairs += turns
        owner += [index] * len(turns)
        position += list(range(1, len(turns) + 1))
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                  add_special_tokens=False)
    preds = generate(model, tokenizer, prompts, generation)
    right = [scorer([p], [r]).get("exact_match", 0.0) == 1.0 for p, r in zip(preds, refs)]
    scores = {**scorer(preds, refs), "turns": len(pairs), "conversations": len(records)}
    for k in sorted(set(position)):
        at_k = [ok for ok, pos in zip(right, position) if pos == k]
        scores[f"exact_match_turn{k}"] = sum(at_k) / len(at_k)
    whole = [all(ok for ok, o in zip(right, owner) if o == i) for i in range(len(records))]
    scores["conversation_exact_match"] = sum(whole) / max(len(records), 1)
    samples = [{"instruction": asked[i], "turn": position[i], "reference": refs[i], "prediction": preds[i]}
               for i in range(len(pairs)) if owner[i] < config.samples]
    result = {**scores, "samples": samples}
    if keep_rows:
        result["rows"] = [
            {"instruction": asked[i], "turn": position[i], "prompt": prompts[i], "reference": refs[i],
             "prediction": preds[i], "scores": row_scores(scorer, preds[i], refs[i])}
            for i in range(len(pairs))
        ]
    return result
