"""The per-batch scheduler (`--scheduler batch`), and the `Job` every scheduler hands its HTTP handler.

One worker thread owns the model and runs the waiting requests together, batch after batch.
Batching is per batch (static), not continuous (serve/continuous.py is): the worker takes up to
`max_batch` waiting requests (waiting `batch_wait_ms` for more to arrive), runs them as one
mixed-adapter batch to the end, then takes the next ones. Within a batch each request leaves as
soon as it finishes, so short requests free their compute, and a cancelled one (its client went
away) leaves at the next step. Requests that arrive meanwhile wait for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from lorakit.infer.multi_adapter import Request, generate_mixed

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared and hashed by identity: schedulers keep sets of jobs
class Job:
    """A request waiting for or inside a batch, and the event queue its HTTP handler reads.

    Events: ("text", str) as text is produced, then ("done", Completion) or ("error", (status, message, ...)).
    """

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server's event loop is gone (shutting down): nobody is listening
            self.cancelled = True

    def on_text(self, text: str) -> bool:
        """Hand out new text (if any); False once the client has gone."""
        if text:
            self.emit("text", text)
        return not self.cancelled


class BatchScheduler:
    def __init__(self, model, tokenizer, registry, max_batch: int = 16, batch_wait_ms: float = 5.0):
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="lorakit-generate", daemon=True)
        self.batches = 0  # batches run so far, the most requests one held, requests dropped by cancelling
        self.largest_batch = 0
        self.cancelled = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> Job:
        """Queue a request; must be called from the event loop that will read the job's events."""
        job = Job(request, asyncio.get_running_loop())
        self.waiting.put(job)
        return job

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as err:  # a bug must fail the batch's requests, never the worker
                log.exception("batch of %d requests failed", len(batch))
                for job in batch:
                    job.emit("error", (500, f"generation failed: {err}"))

    def _next_batch(self) -> list[Job] | None:
        first = self.waiting.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            try:
                job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.waiting.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _run(self, batch: list[Job]) -> None:
        with self.registry.lock:  # no adapter is loaded or unloaded while the batch runs
            runnable = []
            for job in batch:
                adapter = job.request.adapter
                if job.cancelled:
                    continue
                if adapter is not None and adapter not in self.registry.paths:
                    job.emit(
                        "error", (404, f"adapter '{adapter}' was unloaded before the request ran", "model")
                    )
                else:
                    runnable.append(job)
            if not runnable:
                return

            def on_text(i: int, text: str) -> bool:
                return runnable[i].on_text(text)

            completions = generate_mixed(self.model, self.tokenizer, [j.request for j in runnable], on_text)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(runnable))
            self.cancelled += sum(c.finish_reason == "cancelled" for c in completions)
        for job, completion in zip(runnable, completions):
            job.emit("done", completion)
