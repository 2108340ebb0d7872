"""Turn a record into a (prompt, response) pair of strings.

Instruction and alpaca records go through a :class:`PromptTemplate`, a pair of ``str.format``
strings with ``{instruction}`` and ``{input}`` placeholders; the response is the record's
``output`` unchanged. Chat records go through the tokenizer's own ``chat_template`` via
:class:`ChatTemplate`. Tokenising the two parts and masking the prompt is ``masking.py``'s job.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.data.chat import TRAIN_ON, render_prompt, to_messages
from lorakit.data.formats import LINE_KEY, SOURCE_KEY, DataError, where

SEED_TEMPLATE = "### Instruction:\n{instruction}\n\n### Command:\n"
"""The first (ROS 2 command) seed's prompt; the response, ``{output}``, follows it directly."""

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

PLACEHOLDERS = ("instruction", "input")
"""The record fields a prompt template may name; ``{output}`` is the response, never the prompt."""


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format string; the record's ``output`` is the response.

    Attributes:
        name: shown in messages and logs.
        prompt: format string with ``{instruction}`` and optionally ``{input}``.
        prompt_no_input: used instead of ``prompt`` when a record's ``input`` is empty or
            missing; ``None`` means use ``prompt`` with ``input`` as ``""``.
    """

    name: str
    prompt: str
    prompt_no_input: str | None = None

    special_tokens_in_prompt: ClassVar[bool] = False
    """Whether the rendered prompt already holds BOS and the like (so none are added)."""

    def __post_init__(self) -> None:
        fields = _placeholders(self.prompt, self.name)
        if "instruction" not in fields:
            raise DataError(
                f"template {self.name!r} has no {{instruction}} placeholder; "
                f"expected a format string such as {SEED_TEMPLATE!r}"
            )
        if self.prompt_no_input is not None and "input" in _placeholders(self.prompt_no_input, self.name):
            raise DataError(f"template {self.name!r}: prompt_no_input must not use {{input}}")

    @property
    def uses_input(self) -> bool:
        """Whether records' ``input`` field appears in the prompt."""
        return "input" in _placeholders(self.prompt, self.name)

    def render(self, record: dict[str, Any]) -> tuple[str, str]:
        """Return ``(prompt_text, response_text)`` for an instruction or alpaca record.

        Raises:
            DataError: a chat record, a missing or non-string field, or a non-empty ``input``
                this template has no place for (it would be silently dropped).
        """
        at = where(record)
        if "messages" in record or "conversations" in record:
            raise DataError(f"{at}: a chat record cannot use template {self.name!r}; use template 'chat'")
        instruction = _field(record, "instruction", at)
        output = _field(record, "output", at)
        user_input = record.get("input")
        user_input = "" if user_input is None else _field(record, "input", at)
        if not user_input.strip() and self.prompt_no_input is not None:
            return self.prompt_no_input.format(instruction=instruction), output
        if user_input.strip() and not self.uses_input:
            raise DataError(
                f"{at}: field 'input' is set but template {self.name!r} has no {{input}} placeholder; "
                "use template 'alpaca' or a custom template with {input}"
            )
        return self.prompt.format(instruction=instruction, input=user_input), output


@dataclass(frozen=True)
class ChatTemplate:
    """Render through the tokenizer's ``chat_template`` (see ``lorakit.data.chat``).

    ``render`` gives the prompt for the last assistant turn, the conversation before it rendered
    with the generation prompt (e.g. ``<|im_start|>assistant\\n``), and that turn's content; it is
    what generation and scoring use. Training labels every assistant turn (``train_on``) through
    ``lorakit.data.chat.tokenize_conversation``. Instruction records become one user turn
    (instruction, then input after a blank line) and one assistant turn; ShareGPT records are mapped
    to messages.
    """

    tokenizer: Any  # a transformers tokenizer with a chat_template
    name: str = "chat"
    train_on: str = "all_assistant"  # or "last_assistant": which assistant turns carry labels

    special_tokens_in_prompt: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            owner = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise DataError(
                f"template 'chat' needs a tokenizer with a chat_template, and {owner!r} has none; "
                "use template 'seed' or 'alpaca', or set tokenizer.chat_template"
            )
        if self.train_on not in TRAIN_ON:
            raise DataError(f"data.train_on: given {self.train_on!r}, expected one of {', '.join(TRAIN_ON)}")

    def render(self, record: dict[str, Any]) -> tuple[str, str]:
        """Return ``(prompt_text, response_text)`` for a chat, ShareGPT or instruction record.

        Raises:
            DataError: the conversation does not end with an assistant message, or the chat
                template rejects it.
        """
        at = where(record)
        if "messages" not in record and "conversations" not in record:
            _field(record, "instruction", at)
            _field(record, "output", at)
        messages = to_messages(record)
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{at}: expected the conversation to end with an 'assistant' message")
        if len(messages) < 2:
            raise DataError(f"{at}: expected at least one message (system or user) before the assistant's")
        return render_prompt(self.tokenizer, messages[:-1], at), messages[-1]["content"]

    def render_turns(self, record: dict[str, Any]) -> list[tuple[str, str]]:
        """``(prompt_text, response_text)`` for every assistant turn, earlier replies as history."""
        messages = to_messages(record)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
        return [self.render({"messages": messages[: i + 1], **_location(record)}) for i in turns]


def _placeholders(text: str, name: str) -> set[str]:
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as err:
        raise DataError(
            f"template {name!r} is not a valid format string ({err}); write literal braces as {{{{ }}}}"
        ) from None
    allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for field in sorted(fields):
        if field == "output":
            raise DataError(
                f"template {name!r} uses {{output}}; the response follows the prompt, so use only {allowed}"
            )
        if field not in PLACEHOLDERS:
            raise DataError(f"template {name!r} has unknown placeholder {{{field}}}; allowed: {allowed}")
    return fields


def _location(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in (SOURCE_KEY, LINE_KEY) if k in record}


def _field(record: dict[str, Any], key: str, at: str) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{at}: field {key!r} is missing (expected a string)")
    if not isinstance(record[key], str):
        raise DataError(f"{at}: field {key!r} is {type(record[key]).__name__} (expected a string)")
    return record[key]


TEMPLATE_NAMES = ("seed", "ros2", "alpaca", "chat")

_BUILTIN = {
    "seed": PromptTemplate("seed", SEED_TEMPLATE),
    "alpaca": PromptTemplate("alpaca", ALPACA_TEMPLATE, ALPACA_NO_INPUT_TEMPLATE),
}
_BUILTIN["ros2"] = _BUILTIN["seed"]


def get_template(
    spec: str | PromptTemplate | ChatTemplate, tokenizer: Any = None, train_on: str = "all_assistant"
) -> PromptTemplate | ChatTemplate:
    """Resolve a template by name, from a custom format string, or pass one through.

    Args:
        spec: ``"seed"`` (alias ``"ros2"``), ``"alpaca"``, ``"chat"``, a format string holding
            ``{instruction}`` (and optionally ``{input}``), or a template object.
        tokenizer: needed for ``"chat"``.
        train_on: for ``"chat"``: ``"all_assistant"`` or ``"last_assistant"`` turns carry labels.

    Raises:
        DataError: an unknown name, a custom string with unknown placeholders, or ``"chat"``
            without a tokenizer that has a chat template.
    """
    if isinstance(spec, PromptTemplate | ChatTemplate):
        return spec
    if not isinstance(spec, str):
        raise DataError(f"template must be a name or a format string, got {type(spec).__name__}")
    if spec == "chat":
        if tokenizer is None:
            raise DataError("template 'chat' needs the tokenizer (its chat_template renders the prompt)")
        return ChatTemplate(tokenizer, train_on=train_on)
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    if "{" in spec:
        return PromptTemplate("custom", spec)
    raise DataError(
        f"unknown template {spec!r}; expected one of {', '.join(TEMPLATE_NAMES)} "
        "or a format string with an {instruction} placeholder"
    )
