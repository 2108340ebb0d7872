"""The continuous-batching scheduler (`--scheduler continuous`, the default).

One worker thread owns the model and a `RunningBatch`. Each turn of its loop it takes the requests
that arrived, admits waiting ones first come first served while the batch has room (`max_batch`
rows, `max_kv_tokens` KV-cache tokens, counting each row's prompt plus its max_tokens), prefills
them and adds them to the batch, then decodes one token for every row. A request that arrives
while others decode thus starts at the next step instead of waiting for the whole batch; a row
that finishes, or whose client goes away, leaves at once and frees its room.

Fairness: admission is strictly in arrival order. When the oldest waiting request does not fit,
nobody behind it is admitted ahead of it; rows only leave, so it runs as soon as enough of them
have finished, and no request starves.

Adapters are loaded and unloaded between turns (the worker holds the registry's lock for a turn);
the worker reports which adapters its rows use, so an unload waits for those rows to finish.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

from lorakit.infer.continuous import RunningBatch
from lorakit.infer.multi_adapter import Completion, Request
from lorakit.serve.scheduler import Job

log = logging.getLogger(__name__)


class ContinuousScheduler:
    def __init__(
        self,
        model,
        tokenizer,
        registry,
        max_batch: int = 16,
        max_kv_tokens: int = 65536,
        batch_wait_ms: float = 5.0,
        prefill: str = "beside",
    ):
        self.registry = registry
        self.max_batch, self.max_kv_tokens, self.batch_wait = max_batch, max_kv_tokens, batch_wait_ms / 1000
        self.batch = RunningBatch(model, tokenizer, prefill=prefill)
        self.arrivals: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()  # arrived, not yet admitted, oldest first
        self.inflight: set[Job] = set()  # admitted and not finished
        self.stopping = False
        self._version = registry.version
        self.thread = threading.Thread(target=self._work, name="lorakit-generate", daemon=True)
        self.batches = 0  # admissions (prefills) so far, decode steps, the most rows at once, rows cancelled
        self.steps = 0
        self.largest_batch = 0
        self.cancelled = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.arrivals.put(None)
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> Job:
        """Queue a request; must be called from the event loop that will read the job's events."""
        job = Job(request, asyncio.get_running_loop())
        self.arrivals.put(job)
        return job

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopping:
            self._take_arrivals()
            try:
                self._turn()
            except Exception as err:  # a bug must fail the requests in flight, never the worker
                log.exception("generation step failed with %d requests in flight", len(self.inflight))
                self.batch.cancel_all()
                for job in self.inflight:
                    job.emit("error", (500, f"generation failed: {err}"))
                self.inflight.clear()
                with self.registry.lock:
                    self.registry.set_busy([])
        for job in [*self.inflight, *self.waiting]:
            job.emit("error", (503, "the server is shutting down"))

    def _take_arrivals(self) -> None:
        """Move arrived requests to `waiting`. With nothing to do, wait for one, then up to batch_wait
        for more, so requests arriving together are prefilled together."""
        if not len(self.batch) and not self.waiting:
            first = self.arrivals.get()
            if first is None:
                self.stopping = True
                return
            self.waiting.append(first)
            deadline = time.monotonic() + self.batch_wait
            while len(self.waiting) < self.max_batch:
                try:
                    job = self.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.stopping = True
                    return
                self.waiting.append(job)
        while True:
            try:
                job = self.arrivals.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
                return
            self.waiting.append(job)

    def _turn(self) -> None:
        """Admit what fits, prefill it into the batch, decode one step."""
        with self.registry.lock:
            if self.registry.version != self._version:
                self.batch.adapters_changed()
                self._version = self.registry.version
            joining = self._admit()
            if joining:
                self.inflight.update(joining)
                self.batch.join(
                    [job.request for job in joining],
                    [job.on_text for job in joining],
                    [self._on_done(job) for job in joining],
                )
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(self.batch))
            if len(self.batch):
                self.batch.step()
                self.steps += 1
            self.registry.set_busy(self.batch.adapters())

    def _admit(self) -> list[Job]:
        """The waiting requests that join now: oldest first, while rows and KV tokens allow; one that
        does not fit stops admission (nobody overtakes it). Cancelled requests are dropped, and those
        for an adapter unloaded meanwhile refused."""
        joining: list[Job] = []
        kv_tokens = self.batch.kv_tokens()
        while self.waiting and len(self.batch) + len(joining) < self.max_batch:
            job = self.waiting[0]
            adapter = job.request.adapter
            if job.cancelled:
                self.waiting.popleft()
                continue
            if adapter is not None and adapter not in self.registry.paths:
                self.waiting.popleft()
                job.emit("error", (404, f"adapter '{adapter}' was unloaded before the request ran", "model"))
                continue
            need = len(job.request.prompt_ids) + job.request.max_tokens
            if kv_tokens + need > self.max_kv_tokens and (len(self.batch) or joining):
                break  # waits for rows to leave; the server refuses requests that could never fit
            self.waiting.popleft()
            joining.append(job)
            kv_tokens += need
        return joining

    def _on_done(self, job: Job):
        def done(completion: Completion) -> None:
            self.inflight.discard(job)
            if completion.finish_reason == "cancelled":
                self.cancelled += 1
            job.emit("done", completion)

        return done
