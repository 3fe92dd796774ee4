"""The request batcher: one worker thread owns the engine and runs waiting requests together.

Requests arrive from the HTTP event loop through a bounded thread-safe queue. The worker takes the first
waiting request, waits `batch_wait_s` for others to arrive (concurrent clients usually land within a few
milliseconds of each other), and runs up to `max_batch` of them as one batch on the decode engine (`generate.Engine`).
Requests that come while a batch is decoding wait for the next one. After every chunk the worker hands each
request its new tokens through the request's `on_event` callback, so streams see text while the batch runs,
and it drops rows whose request was cancelled.

All JAX calls happen on the worker thread; the event loop only tokenizes, detokenizes and writes HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from picochat_jax.config import ServeConfig
from picochat_jax.generate import Engine, SamplingParams

_SERVE = ServeConfig()  # the defaults of the config tree's serve: section

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The waiting queue is full: the server answers 503 rather than queueing without bound."""


class ShuttingDown(RuntimeError):
    """The batcher was closed; no new work is accepted."""


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: kind "tokens" (new ids), "finish" (reason) or "error" (message)."""

    kind: str
    tokens: tuple[int, ...] = ()
    reason: str | None = None
    message: str | None = None


@dataclass
class GenerationRequest:
    """One prompt to complete. `on_event` is called from the worker thread and must not block."""

    prompt: list[int]
    sampling: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a closed event loop or a broken consumer must not take the worker down
            log.debug("dropping event for a request whose consumer is gone", exc_info=True)


@dataclass(frozen=True)
class BatcherStats:
    batches_run: int
    requests_done: int
    max_batch_seen: int
    tokens_generated: int
    queued: int


class Batcher:
    """Owns the decode engine on a background thread; `submit` is safe from any thread."""

    def __init__(self, engine: Engine, stop_ids: Sequence[int], *, max_batch: int | None = None,
                 batch_wait_s: float = _SERVE.batch_wait_ms / 1000.0, max_queue: int = _SERVE.max_queue):
        self.engine = engine
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.max_batch = min(max_batch or engine.max_batch, engine.max_batch)
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._deferred: deque[GenerationRequest] = deque()  # taken from the queue but did not fit a batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batches_run = self._requests_done = self._max_batch_seen = self._tokens = 0

    # ------------------------------------------------------------------------------------------ public

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def start(self) -> None:
        """Start the worker (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self._stop.is_set():
            raise ShuttingDown("the batcher was closed and cannot be restarted")
        self._thread = threading.Thread(target=self._loop, name="picochat-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: running rows are cancelled, waiting requests get an error event."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_waiting("the server is shutting down")

    def submit(self, request: GenerationRequest) -> None:
        if self._stop.is_set():
            raise ShuttingDown("the server is shutting down")
        self.engine.check_fits(len(request.prompt), request.sampling.max_new_tokens)
        try:
            self._queue.put_nowait(request)
        except queue.Full as exc:
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting; retry later") from exc

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._batches_run, self._requests_done, self._max_batch_seen, self._tokens,
                                self._queue.qsize() + len(self._deferred))

    def warmup(self, prompt: Sequence[int], max_new_tokens: int = 2) -> None:
        """Compile the smallest programs before the first client waits for them (call before start())."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start(): the worker owns the engine")
        for _ in self.engine.run([list(prompt)], [SamplingParams(max_new_tokens)], self.stop_ids):
            pass

    # ------------------------------------------------------------------------------------------ worker

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._take_batch()
                if batch:
                    self._run(batch)
            except Exception:  # never let one bad batch end the worker: the server would hang silently
                log.exception("batcher worker error")

    def _take_batch(self) -> list[GenerationRequest]:
        candidates = list(self._deferred)
        self._deferred.clear()
        if not candidates:
            try:
                candidates.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(candidates) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                candidates.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        # A batch shares one cache layout: the longest prompt plus the largest max_tokens must fit the
        # context. Requests that would break that wait (in order) for the next batch.
        chosen: list[GenerationRequest] = []
        longest = most_new = 0
        for req in candidates:
            if req.cancelled.is_set():
                req.emit(Event("finish", reason="cancelled"))
                continue
            p = max(longest, len(req.prompt))
            m = max(most_new, req.sampling.max_new_tokens)
            if len(chosen) < self.max_batch and p + m <= self.engine.max_len:
                chosen.append(req)
                longest, most_new = p, m
            else:
                self._deferred.append(req)
        return chosen

    def _run(self, batch: list[GenerationRequest]) -> None:
        with self._lock:
            self._batches_run += 1
            self._max_batch_seen = max(self._max_batch_seen, len(batch))
        open_rows = [True] * len(batch)

        def close_row(i: int, last_event: Event) -> None:
            # Counted before the last event goes out, so a client that has its answer already sees itself
            # in stats(): counting after the whole batch raced the next snapshot.
            open_rows[i] = False
            with self._lock:
                self._requests_done += 1
            batch[i].emit(last_event)

        def cancelled() -> list[bool]:
            return [self._stop.is_set() or r.cancelled.is_set() for r in batch]

        try:
            for result in self.engine.run([r.prompt for r in batch], [r.sampling for r in batch], self.stop_ids,
                                          cancelled):
                for i, req in enumerate(batch):
                    if result.tokens[i]:
                        with self._lock:
                            self._tokens += len(result.tokens[i])
                        req.emit(Event("tokens", tokens=tuple(result.tokens[i])))
                    if result.finished[i] is not None:
                        close_row(i, Event("finish", reason=result.finished[i]))
        except Exception as exc:
            log.exception("generation failed for a batch of %d requests", len(batch))
            for i in range(len(batch)):
                if open_rows[i]:
                    close_row(i, Event("error", message=f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:  # rows the engine ended without a finish: none expected
                self._requests_done += sum(open_rows)

    def _fail_waiting(self, message: str) -> None:
        waiting = list(self._deferred)
        self._deferred.clear()
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for req in waiting:
            req.emit(Event("error", message=message))
