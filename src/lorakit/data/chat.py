"""Conversations on the tokenizer's own chat template: one rendering for training, generation and serving.

Records hold OpenAI ``messages`` (``role``/``content``) or ShareGPT ``conversations`` (``from``/
``value``, with ``human``/``gpt`` roles); :func:`to_messages` makes both the same list of messages.

Assistant turns are found by rendering, never by searching token ids, so templates without
``{% generation %}`` markers (SmolLM2's, Qwen2's, Llama-3's) work: the conversation up to assistant
turn *i*, rendered with the generation prompt, must be a prefix of the whole conversation's
rendering, and the turn's content (or, for templates that trim it, its stripped form) must follow
it. The text is cut at those character positions and each piece tokenised on its own, so the
label boundary is a position. Labels cover each trained assistant turn's content and the
end-of-turn special token the template writes right after it (``<|im_end|>``, ``<|eot_id|>``,
``</s>``), nothing else; a turn the template closes with no special token gets no end label,
except the last one, which is then given the tokenizer's EOS so the model learns to stop.

Generation and the server render a prompt with :func:`render_prompt` and tokenise it with
:func:`prompt_ids`: the same text and ids training saw in front of the reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jinja2

from lorakit.data.formats import DataError, where
from lorakit.data.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

TRAIN_ON = ("all_assistant", "last_assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
}


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The record's conversation as ``[{"role", "content"}]``: ``messages`` as given, ShareGPT mapped
    (its record-level ``system`` field first, as LLaMA-Factory reads it).

    Instruction records become one user turn (instruction, then input after a blank line) and one
    assistant turn.

    Raises:
        DataError: a ShareGPT turn with an unknown ``from`` or a non-string ``value``.
    """
    at = where(record)
    if "messages" in record:
        out = []
        for i, m in enumerate(record["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{at}: field 'messages[{i}]' is not a {{role, content}} object with string values")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "conversations" in record:
        system = record.get("system")
        out = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        for i, turn in enumerate(record["conversations"]):
            role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise DataError(
                    f"{at}: field 'conversations[{i}]' is not a {{from, value}} turn with from one of "
                    f"{', '.join(SHAREGPT_ROLES)}"
                )
            out.append({"role": role, "content": turn["value"]})
        return out
    user = record.get("instruction")
    if not isinstance(user, str):
        raise DataError(f"{at}: field 'instruction' is missing (expected a string)")
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        user = f"{user}\n\n{extra}"
    reply = record.get("output")
    if not isinstance(reply, str):
        raise DataError(f"{at}: field 'output' is missing (expected a string)")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def chat_prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation a reply is generated for: the record's messages, less a trailing assistant turn.

    Raises:
        DataError: no ``messages``/``conversations`` field, or nothing left before the reply.
    """
    at = where(record)
    if not isinstance(record.get("messages", record.get("conversations")), list):
        raise DataError(f"{at}: field 'messages' is missing (expected a list of {{role, content}} objects)")
    messages = to_messages(record)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{at}: the conversation holds no user turn to reply to")
    return messages


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool, at: str = "<messages>") -> str:
    """The chat template's text for ``messages``; a template error, or no template, becomes one DataError line."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{at}: a conversation is rendered with the tokenizer's chat template, and this tokenizer "
                        "has none; use a model with one, or give the prompt as text with a template (seed, alpaca)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as err:
        raise DataError(f"{at}: the tokenizer's chat template rejected the conversation ({err})") from None


def render_prompt(tokenizer: Any, messages: list[dict], at: str = "<messages>") -> str:
    """The text in front of the next assistant reply: ``messages`` rendered with the generation prompt."""
    return render(tokenizer, messages, True, at)


def prompt_ids(tokenizer: Any, messages: list[dict], at: str = "<messages>") -> list[int]:
    """Token ids of :func:`render_prompt` (the template writes BOS and the like itself, so none are added)."""
    return tokenizer(render_prompt(tokenizer, messages, at), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Span:
    """Character positions of one assistant turn's content in the whole conversation's text."""

    start: int
    end: int
    trained: bool


def assistant_spans(tokenizer: Any, messages: list[dict], train_on: str, at: str) -> tuple[str, list[Span]]:
    """The whole conversation's text and where each assistant turn's content lies in it.

    Raises:
        DataError: no assistant turn, or a turn whose content cannot be located by rendering.
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on: given {train_on!r}, expected one of {', '.join(TRAIN_ON)}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{at}: the conversation has no assistant turn; expected at least one reply to learn")
    if turns[0] == 0:
        raise DataError(f"{at}: the conversation starts with the assistant; expected a system or user turn first")
    text = render(tokenizer, messages, False, at)
    spans = []
    for number, i in enumerate(turns, 1):
        prefix = render(tokenizer, messages[:i], True, at)
        content = messages[i]["content"]
        start = len(prefix)
        shown = next((c for c in (content, content.strip()) if text.startswith(c, start)), None)
        if not text.startswith(prefix) or shown is None or (spans and start < spans[-1].end):
            raise DataError(
                f"{at}: cannot locate assistant turn {number} in the chat template's rendering (the conversation "
                "up to it, rendered with the generation prompt, is not followed by its content); this template "
                "renders earlier turns differently from the last one"
            )
        spans.append(Span(start, start + len(shown), train_on == "all_assistant" or i == turns[-1]))
    return text, spans


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (named ones and added tokens marked special)."""
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in added.items() if getattr(token, "special", False))
    return ids


def tokenize_conversation(
    tokenizer: Any, record: dict[str, Any], max_length: int, train_on: str = "all_assistant"
) -> dict[str, Any]:
    """``input_ids``, ``labels`` and ``attention_mask`` of a conversation, labelled on its assistant turns.

    A conversation longer than ``max_length`` loses its end (the start holds the system prompt and
    the history every later turn depends on); ``truncated`` and ``response_truncated`` say so.

    Raises:
        DataError: a turn cannot be located, or no token would carry a label (named by ``file:line``).
    """
    at = where(record)
    messages = to_messages(record)
    text, spans = assistant_spans(tokenizer, messages, train_on, at)
    specials = special_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for n, span in enumerate(spans):
        context = _ids(tokenizer, text[cursor : span.start])
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        reply = _ids(tokenizer, text[span.start : span.end])
        after_end = spans[n + 1].start if n + 1 < len(spans) else len(text)
        after = _ids(tokenizer, text[span.end : after_end])
        closing = after[:1] if after and after[0] in specials else []
        if not closing and n + 1 == len(spans) and tokenizer.eos_token_id is not None:
            # the last reply, closed by no special token (nothing, or plain text such as "\n"): EOS right after it
            closing, after = [tokenizer.eos_token_id], [tokenizer.eos_token_id, *after]
        ids += reply + after
        labels += reply + closing if span.trained else [IGNORE_INDEX] * (len(reply) + len(closing))
        labels += [IGNORE_INDEX] * (len(after) - len(closing))
        cursor = after_end
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(
            f"{at}: no token of the assistant turns carries a label (empty replies and no end-of-turn token); "
            "expected at least one non-empty assistant reply"
        )
    n_labels = sum(label != IGNORE_INDEX for label in labels)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": [1] * len(ids),
        "truncated": truncated,
        "response_truncated": truncated and sum(label != IGNORE_INDEX for label in labels) < n_labels,
    }


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
