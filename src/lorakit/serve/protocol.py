"""OpenAI's request and response shapes: read a JSON body into `Request`s, write the replies.

Only what lorakit can honour is accepted; a field it cannot honour (n > 1, logprobs, token-id
prompts, echo, best_of, suffix, penalties, logit_bias, tools, a response_format other than text:
`UNHONOURED`) is refused with a 400 naming the field rather than silently ignored. Fields it does not
know are ignored, as OpenAI's own server does for new client fields. One field beyond OpenAI's is
read, as vLLM and llama.cpp's server read it: `ignore_eos: true` generates exactly max_tokens
tokens (for benchmarks).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

from lorakit.data.formats import json_type
from lorakit.infer.multi_adapter import Completion, Request
from lorakit.serve.config import ServeConfig


class ApiError(Exception):
    """An error reply: HTTP status, message, and the OpenAI error type and param."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",  # as OpenAI's (an unknown model: code model_not_found)
        405: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    """A parsed completion or chat request: the model it names, its prompts and whether it streams."""

    model: str
    prompts: list[str]
    chat: bool
    stream: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None  # None: each prompt samples from a seed of its own, drawn at random (as OpenAI, vLLM)
    stop: tuple[str, ...]
    ignore_eos: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage, as OpenAI sends
    max_tokens_given: bool = True  # False: the default, cut to the room the prompt leaves (serve/inputs.py)
    created: int = field(default_factory=lambda: int(time.time()))  # one stamp for every piece of the reply


MAX_SEED = 2**63 - 1  # a generator's seed (PyTorch takes 64-bit seeds)
# OpenAI fields lorakit cannot honour, each accepted only at a value that asks for nothing (else a 400 naming it)
UNHONOURED = {
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
}
ROLES = ("system", "developer", "user", "assistant")  # what a chat template renders; tool turns are not supported


def parse_ask(body, chat: bool, limits: ServeConfig, render_chat) -> Ask:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", str, required=True)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content: a string or a list of text "
                           f"parts}}, each role one of {', '.join(ROLES)}", "messages")
        texts = [{"role": m["role"], "content": _text(m["content"], i)} for i, m in enumerate(messages)]
        prompts = [render_chat(texts)]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
    if _get(body, "n", int, default=1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if body.get("logprobs") is not None and body.get("logprobs") is not False:  # 0 asks for the chosen token's
        raise ApiError(400, "logprobs are not supported", "logprobs")
    limit_key = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    default = min(256 if chat else 16, limits.max_tokens)  # OpenAI's defaults, within the server's limit
    max_tokens = _get(body, limit_key, int, default=default)
    max_tokens_given = body.get(limit_key) is not None
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400, f"'{limit_key}' must be between 1 and {limits.max_tokens} (got {max_tokens})", limit_key
        )
    temperature = float(_get(body, "temperature", (int, float), default=1.0))
    top_p = float(_get(body, "top_p", (int, float), default=1.0))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2 (got {temperature})", "temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1] (got {top_p})", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    seed = _get(body, "seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"'seed' must be an integer from 0 to {MAX_SEED} (got {seed})", "seed")
    for key, honoured in UNHONOURED.items():
        if key in body and not honoured(body[key]):
            raise ApiError(400, f"'{key}' is not supported (got {body[key]!r})", key)
    stream_options = body.get("stream_options")
    if stream_options is not None and not (isinstance(stream_options, dict) and set(stream_options) <= {"include_usage"}
                                           and isinstance(stream_options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' may hold only include_usage: true or false", "stream_options")
    streamed = bool(_get(body, "stream", bool, default=False))
    if stream_options is not None and not streamed:  # as OpenAI and vLLM answer
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return Ask(
        model=model,
        prompts=prompts,
        chat=chat,
        stream=streamed,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=_get(body, "ignore_eos", bool, default=False),
        include_usage=bool((stream_options or {}).get("include_usage", False)),
        max_tokens_given=max_tokens_given,
    )


def _get(body: dict, key: str, kind, default=None, required: bool = False):
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"'{key}' is required", key)
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ApiError(400, f"'{key}' must be {JSON_TYPES.get(kind, 'a number')} (got {json_type(value)})", key)
    return value


JSON_TYPES = {int: "an integer", str: "a string", bool: "a boolean"}


def _is_message(m) -> bool:
    content = m.get("content") if isinstance(m, dict) else None
    return isinstance(m, dict) and m.get("role") in ROLES and (
        isinstance(content, str) or isinstance(content, list) and all(isinstance(p, dict) for p in content))


def _text(content: str | list[dict], index: int) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts, whose text parts are joined with
    newlines (as vLLM joins them); a part of another type (an image, audio) is refused naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"'messages[{index}].content[{k}]' is a {part.get('type')!r} part; only text parts "
                           "({type: text, text}) are supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def to_requests(ask: Ask, adapter: str | None, prompt_ids: list[list[int]]) -> list[Request]:
    """One request per prompt; without a seed in the body each samples from a seed of its own, drawn at random."""
    return [
        Request(ids, adapter, ask.max_tokens, ask.temperature, ask.top_p,
                ask.seed if ask.seed is not None else secrets.randbits(63), ask.stop, ask.ignore_eos)
        for ids in prompt_ids
    ]


# -- replies ------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def reply(ask: Ask, rid: str, completions: list[Completion]) -> dict:
    """The whole (non-streamed) reply."""
    if ask.chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": finish(c.finish_reason),
            }
            for i, c in enumerate(completions)
        ]
    else:
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": finish(c.finish_reason)}
            for i, c in enumerate(completions)
        ]
    return {
        "id": rid,
        "object": "chat.completion" if ask.chat else "text_completion",
        "created": ask.created,
        "model": ask.model,
        "choices": choices,
        "usage": usage(completions),
    }


def usage(completions: list[Completion]) -> dict:
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def usage_chunk(ask: Ask, rid: str, completions: list[Completion]) -> dict:
    """The last streamed piece with stream_options.include_usage: no choices, the whole request's usage."""
    return {"id": rid, "object": "chat.completion.chunk" if ask.chat else "text_completion",
            "created": ask.created, "model": ask.model, "choices": [], "usage": usage(completions)}


def chunk(
    ask: Ask, rid: str, index: int, text: str | None, reason: str | None = None, role: bool = False
) -> dict:
    """One streamed piece: new text of choice `index`, or its finish reason."""
    if ask.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "finish_reason": finish(reason)}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish(reason)}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if ask.chat else "text_completion",
        "created": ask.created,
        "model": ask.model,
        "choices": [choice],
    }


def model_list(base_name: str, adapters: dict[str, str]) -> dict:
    """GET /v1/models: the base (no parent) and each adapter (its folder as root, the base as parent)."""
    created = int(time.time())
    entries = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit",
                "root": base_name, "parent": None}]
    entries += [
        {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": path, "parent": base_name}
        for name, path in adapters.items()
    ]
    return {"object": "list", "data": entries}
