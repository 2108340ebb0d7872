"""Tokenise (prompt, response) pairs and mask the prompt out of the loss.

The prompt and the response are tokenised separately and their ids concatenated, so the
boundary between them is a position, never found by searching ids. Labels are ``-100`` on every
prompt position and the token id on every response position, including the EOS appended to the
response: masking by position keeps EOS labelled even when ``pad_token_id == eos_token_id`` (the
first seed masked by comparing ids with the pad id, which masked every EOS, so its model never
learned to stop).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from lorakit.data.chat import tokenize_conversation
from lorakit.data.formats import DataError, where
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.templates import ChatTemplate, PromptTemplate, get_template

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "TokenizeStats", "special_prefix_ids", "tokenize_dataset", "tokenize_example",
           "tokenize_shared_prompt"]


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_dataset`."""

    examples: int = 0
    """Examples kept."""
    truncated: int = 0
    """Kept examples cut to ``max_length`` (prompt start and/or response end)."""
    response_truncated: int = 0
    """Kept examples whose response end (and so its EOS) was cut."""
    dropped: int = 0
    """Examples left out because no label token remained."""
    prompt_tokens: int = 0
    """Prompt (masked) tokens in the kept examples, after truncation."""
    response_tokens: int = 0
    """Response (labelled) tokens in the kept examples, EOS included."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tokenize_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    add_eos: bool = True,
    *,
    prompt_has_special_tokens: bool = False,
) -> dict[str, Any]:
    """Tokenise one example with the prompt masked out of the labels.

    Special tokens the tokenizer adds in front of a sequence (BOS) go once at the start of the
    prompt; nothing is added between prompt and response, and tokens it would add at the end are
    not used (the EOS is appended explicitly). When the example is longer than ``max_length`` the
    prompt loses tokens from its start (after BOS) so the response stays whole; if the response
    alone does not fit, the prompt keeps at most its last ``max_length // 2`` tokens and the
    response loses its end, EOS included.

    Args:
        tokenizer: a transformers tokenizer.
        prompt: the rendered prompt text.
        response: the response text.
        max_length: the most tokens the example may have.
        add_eos: append ``tokenizer.eos_token_id`` to the response (labelled, so generation stops).
        prompt_has_special_tokens: the prompt text already holds BOS etc. (a rendered chat
            template), so none are added.

    Returns:
        ``input_ids``, ``labels``, ``attention_mask`` (lists of ints), ``truncated`` and
        ``response_truncated`` (bools). ``labels`` may hold no label at all (empty response);
        the caller decides whether to drop the example.

    Raises:
        ValueError: ``max_length`` is not a positive int, or ``add_eos`` with no EOS token.
    """
    return tokenize_shared_prompt(tokenizer, prompt, [response], max_length, add_eos,
                                  prompt_has_special_tokens=prompt_has_special_tokens)[0]


def tokenize_shared_prompt(
    tokenizer: Any,
    prompt: str,
    responses: list[str],
    max_length: int,
    add_eos: bool = True,
    *,
    prompt_has_special_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Tokenise several responses to one prompt (a preference pair's chosen and rejected), as
    :func:`tokenize_example` does one, keeping the same prompt tokens in every example: the prompt is
    cut as the longest response needs, and each response that still does not fit loses its end. A
    pair whose sides saw different prompts would compare log p(y_w | x) with log p(y_l | x')."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    prefix = [] if prompt_has_special_tokens else special_prefix_ids(tokenizer)
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    replies = [tokenizer(response, add_special_tokens=False)["input_ids"] for response in responses]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token; set one or pass add_eos=False")
        # a response that already ends with the EOS text gets no second one (as TRL's SFT and DPO trainers)
        replies = [ids if response.endswith(tokenizer.eos_token) else [*ids, tokenizer.eos_token_id]
                   for ids, response in zip(replies, responses)]
    return shared_prompt_examples(prefix, body, replies, max_length)


def shared_prompt_examples(prefix: list[int], body: list[int], replies: list[list[int]],
                           max_length: int) -> list[dict[str, Any]]:
    """The examples of :func:`tokenize_shared_prompt` from token ids: `prefix` (special tokens, always kept), the
    prompt `body` (its start cut as the longest reply needs) and each labelled reply (its end cut if still needed)."""
    longest = max(map(len, replies), default=0)
    cut = len(prefix) + len(body) + longest > max_length
    if cut:
        room = max_length - len(prefix)  # positions left for prompt body + response
        if longest < room:
            body = body[len(body) - (room - longest) :]  # keep the prompt's end
        else:
            keep = min(len(body), max(0, max_length // 2 - len(prefix)))
            body = body[len(body) - keep :] if keep else []
        # a prefix longer than max_length (never in practice) is cut too, so the bound holds
        prefix = prefix[:max_length]
    examples = []
    for ids in replies:
        kept = ids[: max(0, max_length - len(prefix) - len(body))] if cut else ids
        input_ids = [*prefix, *body, *kept]
        examples.append({
            "input_ids": input_ids,
            "labels": [IGNORE_INDEX] * (len(prefix) + len(body)) + list(kept),
            "attention_mask": [1] * len(input_ids),
            "truncated": cut,
            "response_truncated": len(kept) < len(ids),
        })
    return examples


def tokenize_dataset(
    tokenizer: Any,
    records: Iterable[dict[str, Any]],
    template: str | PromptTemplate | ChatTemplate,
    max_length: int,
    *,
    add_eos: bool = True,
    train_on: str = "all_assistant",
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Render and tokenise every record; drop examples left with no label token.

    Chat records (``messages`` or ShareGPT ``conversations``) always go through the tokenizer's
    chat template, whatever ``template`` names, with labels on their assistant turns (``train_on``:
    ``all_assistant`` or ``last_assistant``; see ``lorakit.data.chat``). ``template`` applies to
    instruction and alpaca records (``"chat"`` sends those through the chat template too).

    Args:
        tokenizer: a transformers tokenizer.
        records: validated records (see ``formats.validate_records``).
        template: a template name, custom format string or template object (``get_template``).
        max_length: the most tokens an example may have.
        add_eos: append EOS to every response (format-string templates; a chat template writes
            its own end-of-turn token).
        train_on: which assistant turns of a conversation carry labels.

    Returns:
        The kept examples (as :func:`tokenize_example` returns them) and the counts.

    Raises:
        DataError: a record the template cannot render, or a conversation whose assistant turns
            cannot be located or carry no label (the message names ``file:line``), or records none of
            which kept a response token (no records at all give no examples).
    """
    template = get_template(template, tokenizer, train_on)
    examples: list[dict[str, Any]] = []
    stats = TokenizeStats()
    source = first_cut = first_dropped = None
    for record in records:
        source = source or where(record).rsplit(":", 1)[0]
        if isinstance(template, ChatTemplate) or "messages" in record or "conversations" in record:
            example = tokenize_conversation(tokenizer, record, max_length, train_on)
        else:
            prompt, response = template.render(record)
            example = tokenize_example(tokenizer, prompt, response, max_length, add_eos)
        # the first position is never predicted (the loss compares each token's logits with the next label)
        n_labels = sum(label != IGNORE_INDEX for label in example["labels"][1:])
        if n_labels == 0:
            stats.dropped += 1
            first_dropped = first_dropped or where(record)
            logger.debug("%s: dropped, no response token within max_length=%d", where(record), max_length)
            continue
        examples.append(example)
        stats.examples += 1
        stats.truncated += example["truncated"]
        stats.response_truncated += example["response_truncated"]
        first_cut = first_cut or (where(record) if example["response_truncated"] else None)
        stats.response_tokens += n_labels
        stats.prompt_tokens += len(example["labels"]) - n_labels
    _log_stats(stats, max_length, first_cut, first_dropped)
    if not examples and stats.dropped:
        raise DataError(
            f"{source or '<records>'}: no example has a response token left within max_length {max_length} "
            f"(dropped {stats.dropped}); expected non-empty responses and a data.max_length above the prompt lengths"
        )
    return examples, stats


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The special token ids the tokenizer puts before a single sequence (usually ``[bos]`` or ``[]``).

    Found by tokenising a probe text with and without special tokens and taking what precedes
    the plain ids; suffix tokens (an EOS some tokenizers append) are left out on purpose.
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []  # the post-processor rewrites the text itself; add nothing rather than guess


def prompt_token_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Each prompt's ids laid out as training lays them out: the special tokens the tokenizer puts before a sequence
    (unless `add_special_tokens` is false: the texts hold them), then the text; never the ones it puts after (an
    EOS some tokenizers append would end the prompt before the reply it asks for)."""
    prefix = special_prefix_ids(tokenizer) if add_special_tokens and texts else []
    return [[*prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]


def _log_stats(stats: TokenizeStats, max_length: int, first_cut: str | None = None,
               first_dropped: str | None = None) -> None:
    logger.info(
        "tokenised %d examples (%d prompt + %d response tokens); %d truncated to %d tokens, %d dropped",
        stats.examples,
        stats.prompt_tokens,
        stats.response_tokens,
        stats.truncated,
        max_length,
        stats.dropped,
    )
    if stats.response_truncated:
        logger.warning(
            "%s: %d responses were cut at data.max_length=%d and lost their EOS (this one first); "
            "raise data.max_length so the model learns to stop",
            first_cut,
            stats.response_truncated,
            max_length,
        )
    if stats.dropped:
        logger.warning("%s: %d examples were dropped (this one first): no response token fit in max_length=%d",
                       first_dropped, stats.dropped, max_length)
