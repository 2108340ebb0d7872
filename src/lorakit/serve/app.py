"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus adapter
loading (POST /v1/adapters {name, path}) and unloading (DELETE /v1/adapters/NAME).

The request's `model` field picks the adapter: the base model's name runs the bare base, an
adapter's name runs it. Every error is OpenAI's JSON shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.serve.config import ServeConfig
from lorakit.serve.protocol import ApiError, Ask, chunk, new_id, parse_ask, reply, to_requests
from lorakit.serve.registry import AdapterRegistry, RegistryError
from lorakit.serve.scheduler import Job, Scheduler

log = logging.getLogger(__name__)


def build_app(model_name: str, adapters: dict[str, str], config: ServeConfig) -> FastAPI:
    """Load the base model and the startup adapters (NAME -> folder), and make the app.

    Raises:
        RegistryError: an adapter name is not allowed.  AdapterError: an adapter does not load.
    """
    from lorakit.models import default_device, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name).to(default_device()).eval()
    registry = AdapterRegistry(model, config.served_model_name or str(model_name), config.adapters_root)
    for name, path in adapters.items():
        registry.add(name, path)
    return create_app(model, tokenizer, registry, config)


def create_app(model, tokenizer, registry: AdapterRegistry, config: ServeConfig) -> FastAPI:
    """An app serving `model` and the adapters in `registry`; its worker starts with the app."""
    scheduler = Scheduler(model, tokenizer, registry, config.max_batch, config.batch_wait_ms)
    front = copy.deepcopy(tokenizer)  # the event loop's own tokenizer: the worker decodes with the other
    context = getattr(model.config, "max_position_embeddings", None)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.scheduler, app.state.registry = scheduler, registry

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):  # unknown route, wrong method
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    def authorize(request: Request, manage: bool = False) -> None:
        if manage and config.api_key is None:
            raise ApiError(403, "adapter management is off: start the server with --api-key KEY")
        if config.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    async def read_json(request: Request):
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(
                400, f"the request body is over {config.max_body_bytes} bytes", code="body_too_large"
            )
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > config.max_body_bytes:
                raise ApiError(
                    400, f"the request body is over {config.max_body_bytes} bytes", code="body_too_large"
                )
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None

    def render_chat(messages: list[dict]) -> str:
        if not front.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            return front.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template may raise anything (e.g. on an unknown role)
            raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None

    def tokenize(ask: Ask) -> list[list[int]]:
        param = "messages" if ask.chat else "prompt"
        out = []
        for text in ask.prompts:
            ids = front(text, add_special_tokens=not ask.chat)["input_ids"]
            if not 1 <= len(ids) <= config.max_prompt_tokens:
                raise ApiError(
                    400, f"the prompt has {len(ids)} tokens; allowed: 1 to {config.max_prompt_tokens}", param
                )
            if context and len(ids) + ask.max_tokens > context:
                raise ApiError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({ask.max_tokens}) is over the model's "
                    f"context of {context} tokens",
                    param,
                )
            out.append(ids)
        return out

    async def complete(request: Request, chat: bool):
        authorize(request)
        ask = parse_ask(await read_json(request), chat, config, render_chat)
        adapter = None if ask.model == registry.base_name else ask.model
        if adapter is not None and adapter not in registry.paths:
            raise ApiError(
                404,
                f"the model '{ask.model}' does not exist; GET /v1/models lists them",
                "model",
                "model_not_found",
            )
        jobs = [scheduler.submit(r) for r in to_requests(ask, adapter, tokenize(ask))]
        rid = new_id(chat)
        if ask.stream:
            return StreamingResponse(stream(ask, rid, jobs), media_type="text/event-stream")
        try:
            return reply(ask, rid, [await finished(job) for job in jobs])
        finally:
            for job in jobs:
                job.cancelled = True  # a no-op for finished jobs; frees the batch row otherwise

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        created = int(time.time())
        entries = [
            {
                "id": registry.base_name,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "root": registry.base_name,
                "parent": None,
            }
        ]
        entries += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "root": path,
                "parent": registry.base_name,
            }
            for name, path in registry.paths.items()
        ]
        return {"object": "list", "data": entries}

    @app.post("/v1/adapters")
    async def load(request: Request):
        authorize(request, manage=True)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object {name, path}")
        try:  # loading reads files and takes the model lock: off the event loop
            folder = await anyio.to_thread.run_sync(registry.load, body.get("name"), body.get("path"))
        except RegistryError as err:
            raise ApiError(err.status, str(err), err.param) from None
        return {"id": body["name"], "object": "model", "root": str(folder), "parent": registry.base_name}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request):
        authorize(request, manage=True)
        try:
            await anyio.to_thread.run_sync(registry.unload, name)
        except RegistryError as err:
            raise ApiError(err.status, str(err), err.param) from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


async def finished(job: Job):
    """Wait for a job's completion (its text events are not needed without streaming)."""
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise ApiError(*value)


async def stream(ask: Ask, rid: str, jobs: list[Job]):
    """Server-sent events: each choice's text as it comes, its finish reason, then [DONE].

    If the client goes away, Starlette cancels this generator; `finally` then marks the jobs
    cancelled, and the worker drops their rows at its next step.
    """
    try:
        for index, job in enumerate(jobs):
            if ask.chat:
                yield _sse(chunk(ask, rid, index, None, role=True))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield _sse(chunk(ask, rid, index, value))
                elif kind == "done":
                    yield _sse(chunk(ask, rid, index, None, reason=value.finish_reason))
                    break
                else:
                    yield _sse(ApiError(*value).body())
                    return
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled = True


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
