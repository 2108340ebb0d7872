"""Preference pairs (``prompt``, ``chosen``, ``rejected``) for DPO and ORPO: checked, tokenised, batched.

A record is plain or chat:

* plain: three strings. The prompt goes through ``data.template`` as the instruction (the seed
  template by default, so a DPO stage sees the prompt exactly as the SFT stage before it did; use
  ``template: "{instruction}"`` for prompts that are already formatted). Each reply is tokenised
  after it as in supervised training (``lorakit.data.masking.tokenize_shared_prompt``): labels on
  the reply and the EOS appended to it. A pair longer than ``max_length`` keeps the same prompt
  tokens on both sides (cut as the longer reply needs); a reply that still does not fit loses its end.
  TRL tokenises prompt and reply as one text instead, so where a template ends in a space
  (``"A: "``) TRL's reply tokens take that space (``" red"``) and lorakit's prompt keeps it, as
  lorakit's SFT and generation do.
* chat: ``prompt`` is a list of ``{role, content}`` messages (the conversation so far) and each
  reply is a string or a list holding one assistant message (TRL's conversational form). As TRL's
  DPOTrainer does, the prompt is the conversation rendered with the tokenizer's chat template and
  its generation prompt, and each reply is what rendering the whole conversation adds from where
  the two diverge: the reply, its end-of-turn token and whatever the template writes after it
  (no EOS is appended). A long pair is cut as a plain one. A plain record under ``template: chat``
  is a one-user-turn conversation.

An example holds the chosen sequence as ``input_ids``/``labels`` and the rejected one as
``rejected_input_ids``/``rejected_labels``, plus ``ref_logps`` (chosen, rejected) once the
reference log-probabilities are computed (``lorakit.train.reference``). A batch of B pairs is 2B
rows: the chosen sequences, then the rejected ones, padded together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.data.chat import prompt_ids, render
from lorakit.data.collate import pad_batch
from lorakit.data.formats import (
    CHAT_ROLES,
    LINE_KEY,
    SOURCE_KEY,
    DataError,
    json_type,
    unsupported_keys,
    where,
)
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.masking import shared_prompt_examples, tokenize_shared_prompt
from lorakit.data.templates import ChatTemplate, PromptTemplate

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")


def check_preference_record(record: dict[str, Any], at: str) -> None:
    """The ``preference`` record format's checker (``lorakit.data.formats`` calls it).

    Raises:
        DataError: a missing or mistyped field, named with ``file:line``.
    """
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        _check_messages(prompt, at)
    elif not isinstance(prompt, str) or not prompt:
        state = "missing" if "prompt" not in record else _describe(prompt)
        raise DataError(f"{at}: field 'prompt' is {state} (expected a non-empty string or a list of messages)")
    for key in ("chosen", "rejected"):
        reply = record.get(key)
        if isinstance(reply, list):
            if len(reply) != 1 or not isinstance(reply[0], dict) or reply[0].get("role") != "assistant" or not \
                    isinstance(reply[0].get("content"), str):
                raise DataError(f"{at}: field '{key}' is {_describe(reply)} (expected a string or a list holding "
                                "one {role: assistant, content} message)")
        elif not isinstance(reply, str):
            state = "missing" if key not in record else _describe(reply)
            raise DataError(f"{at}: field '{key}' is {state} (expected a string)")
        if isinstance(prompt, str) and isinstance(reply, list):
            raise DataError(f"{at}: field '{key}' is a message list but 'prompt' is a string; give both as "
                            "messages (chat) or both as strings")


def _check_messages(messages: list, at: str) -> None:
    roles = ", ".join(repr(r) for r in CHAT_ROLES)
    if not messages:
        raise DataError(f"{at}: field 'prompt' is an empty list (expected the conversation before the reply)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or \
                not isinstance(message.get("content"), str):
            raise DataError(f"{at}: field 'prompt[{i}]' is {_describe(message)} (expected a {{role, content}} "
                            f"message, role one of {roles})")
        for key in unsupported_keys(message):
            raise DataError(f"{at}: field 'prompt[{i}].{key}' is not supported (lorakit trains on each message's "
                            "text content; write the call into 'content' or leave the turn out)")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{at}: field 'prompt' ends with an assistant message; expected it to end before the reply")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def reply_text(reply: str | list[dict]) -> str:
    """The reply's text: the string itself or its one assistant message's content."""
    return reply if isinstance(reply, str) else reply[0]["content"]


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before the reply: the prompt's messages, or the prompt string as one user turn."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def scoring_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as generation scoring reads it: the prompt, with the chosen reply as the reference."""
    location = {k: record[k] for k in (SOURCE_KEY, LINE_KEY) if k in record}
    chosen = reply_text(record["chosen"])
    if isinstance(record["prompt"], list):
        return {"messages": [*prompt_messages(record), {"role": "assistant", "content": chosen}], **location}
    return {"instruction": record["prompt"], "output": chosen, **location}


@dataclass
class PairStats:
    """Counts from :func:`tokenize_preferences`."""

    pairs: int = 0
    truncated: int = 0  # pairs with either sequence cut to max_length
    dropped: int = 0  # pairs left with no labelled token on one side


def tokenize_pair(tokenizer: Any, record: dict[str, Any], template: PromptTemplate | ChatTemplate,
                  max_length: int) -> tuple[dict[str, Any], bool]:
    """(the pair as an example, whether either side was truncated); see the module docstring."""
    replies = [reply_text(record[key]) for key in ("chosen", "rejected")]
    if isinstance(record["prompt"], list) or isinstance(template, ChatTemplate):
        chosen, rejected = _chat_pair(tokenizer, record, replies, max_length)
    else:  # both sides keep the same prompt tokens, however long either reply
        prompt, _ = template.render({"instruction": record["prompt"], "output": replies[0]})
        chosen, rejected = tokenize_shared_prompt(tokenizer, prompt, replies, max_length)
    example = {"input_ids": chosen["input_ids"], "labels": chosen["labels"],
               "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
    return example, chosen["truncated"] or rejected["truncated"]


def _chat_pair(tokenizer: Any, record: dict[str, Any], replies: list[str], max_length: int) -> list[dict[str, Any]]:
    """A chat pair as TRL's DPOTrainer tokenises it: the conversation rendered with the generation prompt, and each
    reply's part of the whole conversation's rendering, from where the two diverge (the reply, its end-of-turn
    token and whatever the template writes after it) labelled; cut as a plain pair is."""
    at = where(record)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{at}: a chat pair is rendered with the tokenizer's chat template, and this tokenizer has "
                        "none; give the pair as strings (data.template renders them) or use a model with one")
    messages = prompt_messages(record)
    prompt = prompt_ids(tokenizer, messages, at)
    whole = [tokenizer(render(tokenizer, [*messages, {"role": "assistant", "content": reply}], False, at),
                       add_special_tokens=False)["input_ids"] for reply in replies]
    start = min(_common_prefix(prompt, ids) for ids in whole)
    prefix = prompt[:1] if prompt[:1] == [tokenizer.bos_token_id] else []  # a BOS the template writes is kept
    return shared_prompt_examples(prefix, prompt[len(prefix):start], [ids[start:] for ids in whole], max_length)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_preferences(tokenizer: Any, records: list[dict[str, Any]], template: PromptTemplate | ChatTemplate,
                         max_length: int) -> tuple[list[dict[str, Any]], PairStats]:
    """Tokenise every pair; drop pairs whose chosen or rejected side keeps no labelled token.

    Raises:
        DataError: a record the template cannot render, or no pair left (the message names the file).
    """
    examples, stats = [], PairStats()
    same = [record for record in records if reply_text(record["chosen"]) == reply_text(record["rejected"])]
    if same:  # kept (TRL keeps them too), but worth a line: such a pair's loss is log 2 and its gradient zero
        log.warning("%d preference pairs have the same chosen and rejected reply (first: %s); they teach nothing",
                    len(same), where(same[0]))
    for record in records:
        example, truncated = tokenize_pair(tokenizer, record, template, max_length)
        if not _labelled(example["labels"]) or not _labelled(example["rejected_labels"]):
            stats.dropped += 1
            log.debug("%s: dropped, a reply has no token within max_length=%d", where(record), max_length)
            continue
        examples.append(example)
        stats.pairs += 1
        stats.truncated += truncated
    if records and not examples:
        source = where(records[0]).rsplit(":", 1)[0]
        raise DataError(f"{source}: no preference pair keeps a reply token within max_length {max_length} "
                        f"(dropped {stats.dropped}); raise data.max_length")
    if stats.dropped:
        log.warning("%d preference pairs dropped: a reply had no token within max_length=%d", stats.dropped,
                    max_length)
    return examples, stats


def _labelled(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # the first position is never predicted


def collate_pairs(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs as 2B padded rows (chosen rows first), with ``ref_logps`` (2B,) when every pair has them."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    rows += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    batch = pad_batch(rows, pad_token_id)
    if all("ref_logps" in e for e in examples):
        chosen, rejected = zip(*(e["ref_logps"] for e in examples))
        batch["ref_logps"] = torch.tensor([*chosen, *rejected], dtype=torch.float32)
    return batch
