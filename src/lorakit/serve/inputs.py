"""What the server checks in a client's request before it reaches the model: the API key, the body's
size and JSON, the chat template's rendering, and the prompt's token count against the limits.

Every refusal is an `ApiError` (OpenAI's JSON error shape, with its HTTP status).
"""

from __future__ import annotations

import copy
import hmac
import json
import threading

from fastapi import Request

from lorakit.data.chat import render_prompt
from lorakit.data.masking import prompt_token_ids
from lorakit.serve.config import ServeConfig
from lorakit.serve.protocol import ApiError, Ask


class Inputs:
    """The checks, with the server's own copy of the tokenizer (the worker thread decodes with the other)."""

    def __init__(self, config: ServeConfig, tokenizer, context: int | None):
        self.config = config
        self.tokenizer = copy.deepcopy(tokenizer)
        self.context = context  # the model's max_position_embeddings, if it has one
        self._tokenizing = threading.Lock()

    def authorize(self, request: Request, manage: bool = False) -> None:
        """401 without the right `Authorization: Bearer KEY`; 403 for adapter management without a key set."""
        key = self.config.api_key
        if manage and key is None:
            raise ApiError(403, "adapter management is off: start the server with --api-key KEY")
        if key is None:
            return
        scheme, _, sent = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(self, request: Request):
        """The body as JSON, read no further than `max_body_bytes` whatever Content-Length says."""
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_large
        try:
            body = json.loads(data)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone UTF-16 surrogate (\ud800) is no text
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)", code="invalid_json") from None
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate (such as \\ud800); expected text",
                           code="invalid_json") from None
        return body

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text, rendered as training rendered it (`lorakit.data.chat.render_prompt`)."""
        if not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                        for m in messages]  # OpenAI's developer turn is the templates' system turn
            return render_prompt(self.tokenizer, messages, at="'messages'")
        except Exception as err:  # noqa: BLE001 - a template may raise anything (e.g. on an unknown role)
            raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None

    def tokenize(self, ask: Ask) -> list[list[int]]:
        """Each prompt's ids, within max_prompt_tokens and, with max_tokens, within the model's context and the
        server's --max-kv-tokens. A max_tokens the client did not send (the default) is cut to the room the longest
        prompt leaves, as vLLM does, rather than refused for a value no one asked for."""
        param = "messages" if ask.chat else "prompt"
        limit = self.config.max_prompt_tokens
        with self._tokenizing:  # requests tokenize on worker threads; a fast tokenizer is not to be shared at once
            prompts = prompt_token_ids(self.tokenizer, ask.prompts, not ask.chat)
        bounds = [(self.config.max_kv_tokens, "the server's --max-kv-tokens of")]
        if self.context:
            bounds.insert(0, (self.context, "the model's context of"))
        for ids in prompts:
            if not 1 <= len(ids) <= limit:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; allowed: 1 to {limit}", param)
        if not ask.max_tokens_given:
            room = min(bound for bound, _ in bounds) - max(map(len, prompts))
            ask.max_tokens = max(1, min(ask.max_tokens, room))  # none left: refused below, naming the bound
        for ids in prompts:
            for bound, what in bounds:
                if len(ids) + ask.max_tokens > bound:
                    given = f"max_tokens ({ask.max_tokens})" if ask.max_tokens_given else "at least 1 new token"
                    raise ApiError(400, f"prompt ({len(ids)} tokens) + {given} is over {what} {bound} tokens",
                                   param, "context_length_exceeded")
        return prompts
