"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus adapter
loading (POST /v1/adapters {name, path}) and unloading (DELETE /v1/adapters/NAME).

The request's `model` field picks the adapter: the base model's name runs the bare base, an
adapter's name runs it. Every error is OpenAI's JSON shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.serve.config import ServeConfig
from lorakit.serve.inputs import Inputs
from lorakit.serve.protocol import (
    ApiError, Ask, chunk, model_list, new_id, parse_ask, reply, to_requests, usage_chunk,
)
from lorakit.serve.registry import AdapterRegistry, RegistryError
from lorakit.serve.continuous import ContinuousScheduler
from lorakit.serve.scheduler import BatchScheduler, Job
from lorakit.serve.threads import on_a_thread_of_its_own

log = logging.getLogger(__name__)


def build_app(model_name: str, adapters: dict[str, str], config: ServeConfig) -> FastAPI:
    """Load the base model and the startup adapters (NAME -> folder), and make the app.

    Raises:
        RegistryError: an adapter name is not allowed.  AdapterError: an adapter does not load.
    """
    from lorakit.config import ConfigError
    from lorakit.infer.decode_linears import use_decode_linears
    from lorakit.infer.half_weights import use_half_weights
    from lorakit.infer.int8_weights import use_int8_weights
    from lorakit.lora.adapters import LORA_DTYPES
    from lorakit.models import default_device, load_causal_lm, load_tokenizer
    from lorakit.serve.malloc import keep_freed_memory

    def load():
        model = load_causal_lm(model_name).to(default_device()).eval()
        half = use_half_weights(model, config.half_weights, rows=config.max_batch)
        try:
            half = use_int8_weights(model, config.quantize) or half
        except ValueError as err:
            raise ConfigError(f"--quantize: {err}") from None
        log.info("the base model's linear weights: %s", half or "fp32")
        use_decode_linears(model)  # after the cast, which takes plain Linears only
        registry = AdapterRegistry(model, config.served_model_name or str(model_name), config.adapters_root,
                                   LORA_DTYPES[config.lora_dtype])
        for name, path in adapters.items():
            registry.add(name, path)
        return model, registry

    keep_freed_memory()  # batches free and re-allocate the same buffers: keep them (see serve/malloc.py)
    tokenizer = load_tokenizer(model_name)
    model, registry = on_a_thread_of_its_own(load)  # leaves the worker's OpenMP team the only one (threads.py)
    return create_app(model, tokenizer, registry, config)


def create_app(model, tokenizer, registry: AdapterRegistry, config: ServeConfig) -> FastAPI:
    """An app serving `model` and the adapters in `registry`; its worker starts with the app."""
    scheduler = make_scheduler(model, tokenizer, registry, config)
    inputs = Inputs(config, tokenizer, getattr(model.config, "max_position_embeddings", None))

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

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):  # a bug: the client still gets OpenAI's shape
        log.error("internal error answering a request: %s: %s", type(err).__name__, err)
        body = ApiError(500, f"internal server error ({type(err).__name__})").body()
        return JSONResponse(body, status_code=500)

    async def complete(request: Request, chat: bool):
        inputs.authorize(request)
        ask = parse_ask(await inputs.read_json(request), chat, config, inputs.render_chat)
        adapter = None if ask.model == registry.base_name else ask.model
        if adapter is not None and adapter not in registry.paths:
            raise ApiError(
                404,
                f"the model '{ask.model}' does not exist; GET /v1/models lists them",
                "model",
                "model_not_found",
            )
        ids = await anyio.to_thread.run_sync(inputs.tokenize, ask)  # a long list of prompts: off the event loop
        jobs = [scheduler.submit(r) for r in to_requests(ask, adapter, ids)]
        rid = new_id(chat)
        if ask.stream:
            return StreamingResponse(stream(ask, rid, jobs), media_type="text/event-stream")
        try:
            return reply(ask, rid, await all_finished(jobs, request))
        except ClientGone:
            return Response(status_code=499)  # no one reads it: the rows are freed below
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
        inputs.authorize(request)
        return model_list(registry.base_name, registry.paths)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):  # the openai client's models.retrieve
        inputs.authorize(request)
        found = [m for m in model_list(registry.base_name, registry.paths)["data"] if m["id"] == name]
        if not found:
            raise ApiError(404, f"the model '{name}' does not exist; GET /v1/models lists them", "model",
                           "model_not_found")
        return found[0]

    @app.post("/v1/adapters")
    async def load(request: Request):
        inputs.authorize(request, manage=True)
        body = await inputs.read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object {name, path}")
        try:  # loading reads files and takes the model lock: off the event loop
            folder = await anyio.to_thread.run_sync(on_a_thread_of_its_own, registry.load, body.get("name"),
                                                    body.get("path"))
        except RegistryError as err:
            raise ApiError(err.status, str(err), err.param) from None
        return {"id": body["name"], "object": "model", "root": str(folder), "parent": registry.base_name}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request):
        inputs.authorize(request, manage=True)
        try:
            await anyio.to_thread.run_sync(on_a_thread_of_its_own, registry.unload, name)
        except RegistryError as err:
            raise ApiError(err.status, str(err), err.param) from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def make_scheduler(model, tokenizer, registry: AdapterRegistry, config: ServeConfig):
    """The worker `config.scheduler` names (one of `serve.config.SCHEDULERS`)."""
    if config.scheduler == "batch":
        return BatchScheduler(model, tokenizer, registry, config.max_batch, config.batch_wait_ms)
    return ContinuousScheduler(
        model, tokenizer, registry, config.max_batch, config.max_kv_tokens, config.batch_wait_ms, config.prefill
    )


DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still connected


class ClientGone(Exception):
    """The client of a non-streamed request disconnected before its reply."""


async def all_finished(jobs: list[Job], request: Request) -> list:
    """Wait for every job's completion (their text events are not needed without streaming), checking every
    DISCONNECT_POLL_S of wall time, however often events arrive, that the client is still there (else ClientGone:
    the rows are cancelled, as a stream's)."""
    results, checked = [], time.monotonic()
    for job in jobs:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                kind = value = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    raise ClientGone
                checked = time.monotonic()
            if kind == "done":
                results.append(value)
                break
            if kind == "error":
                raise ApiError(*value)
    return results


async def stream(ask: Ask, rid: str, jobs: list[Job]):
    """Server-sent events: each choice's text as it comes, its finish reason, then [DONE].

    If the client goes away, Starlette cancels this generator; `finally` then marks the jobs
    cancelled, and the worker drops their rows at its next step.
    """
    done = []
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
                    done.append(value)
                    break
                else:  # the error, then the end of the stream, as vLLM ends one (SSE clients wait for [DONE])
                    yield _sse(ApiError(*value).body())
                    yield "data: [DONE]\n\n"
                    return
        if ask.include_usage:
            yield _sse(usage_chunk(ask, rid, done))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled = True


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
