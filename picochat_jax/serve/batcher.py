"""The request batcher: one worker thread owns the engine and decodes requests by continuous batching.

Requests arrive from the HTTP event loop through a bounded thread-safe queue. The worker keeps `max_batch` cache
slots (`generate.SlotBatch`): between decode chunks it prefills waiting requests into free slots (up to
`prefill_rows` of them per prefill call), then advances every live slot by one chunk, so requests join and leave the
running batch every chunk and a long reply never holds a short one back. When it is idle, the first request waits
`batch_wait_s` for others to join it before the first chunk. After every chunk the worker hands each request its new
tokens through the request's `on_event` callback, so streams see text while the batch runs, and it frees the slots
of finished and cancelled requests.

The worker keeps one chunk queued ahead: it launches chunk N+1 before it collects chunk N, so the device decodes
while the host hands out tokens and prefills newcomers. A slot that finished in chunk N rides along in chunk N+1 as
done (no tokens); a request admitted after a launch joins the chunk after it.

All JAX calls happen on the worker thread; the event loop only tokenizes, detokenizes and writes HTTP."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    batches_run: int  # decode chunks that gave requests tokens or finished them (each over every live slot)
    requests_done: int
    max_batch_seen: int  # most requests decoding together in one chunk
    tokens_generated: int
    queued: int


class Batcher:
    """Owns the decode engine on a background thread; `submit` is safe from any thread."""

    def __init__(self, engine: Engine, stop_ids: Sequence[int], *, max_batch: int | None = None,
                 batch_wait_s: float = _SERVE.batch_wait_ms / 1000.0, max_queue: int = _SERVE.max_queue,
                 prefill_rows: int = _SERVE.prefill_rows):
        self.engine = engine
        self.prefill_rows = prefill_rows
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.max_batch = min(max_batch or engine.max_batch, engine.max_batch)
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batches_run = self._requests_done = self._max_batch_seen = self._tokens = 0
        self._slots: Any = None  # generate.SlotBatch, made on first use (warmup or the worker)

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
                                self._queue.qsize())

    def warmup(self, filler: int) -> tuple[list[int], list[int]]:
        """Compile every prefill bucket and decode window (`SlotBatch.compile_all`, dummy rows of token `filler`)
        before the first client waits for one; call before start(). Returns (prompt buckets, windows)."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start(): the worker owns the engine")
        return self._slot_batch().compile_all(filler)

    # ------------------------------------------------------------------------------------------ worker

    def _slot_batch(self) -> Any:
        if self._slots is None:
            self._slots = self.engine.slots(self.stop_ids, self.max_batch, self.prefill_rows)
        return self._slots

    def _loop(self) -> None:
        owners: dict[int, GenerationRequest] = {}
        in_flight = None  # the chunk launched last, not yet collected
        while not self._stop.is_set():
            try:
                slots = self._slot_batch()
                idle = not owners
                self._admit(slots, owners, wait_s=0.05 if idle else 0.0)
                if idle and owners:  # the first request of a quiet spell waits briefly for companions
                    self._admit(slots, owners, wait_s=self.batch_wait_s, until_full=True)
                self._cancel(slots, owners)
                launched = slots.launch() if owners else None
                self._hand_out(slots.collect(in_flight), owners)
                in_flight = launched
            except Exception as exc:  # never let one bad chunk end the worker: the server would hang silently
                log.exception("batcher worker error")
                for slot in list(owners):
                    self._close(owners.pop(slot), Event("error", message=f"generation failed: "
                                                                         f"{type(exc).__name__}: {exc}"))
                in_flight = None
                self._slots = None  # the cache may be in any state: start from fresh slots
        for slot in list(owners):
            self._close(owners.pop(slot), Event("finish", reason="cancelled"))

    def _next_waiting(self, timeout: float) -> GenerationRequest | None:
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _admit(self, slots: Any, owners: dict[int, GenerationRequest], wait_s: float,
               until_full: bool = False) -> None:
        """Prefill waiting requests into free slots: those already waiting, or (with `wait_s`) ones that arrive
        within it; `until_full` keeps waiting out `wait_s` while slots are free. Each `prefill_rows` of them go
        to the device in one prefill call as soon as they are in hand, the rest at the end."""
        deadline = time.monotonic() + wait_s
        free = slots.free_slots()
        taken, group = 0, []
        while taken < len(free):
            req = self._next_waiting(max(0.0, deadline - time.monotonic()))
            if req is None:
                if until_full and time.monotonic() < deadline:
                    continue
                break
            if req.cancelled.is_set():
                self._close(req, Event("finish", reason="cancelled"))
                continue
            group.append((free[taken], req))
            taken += 1
            if len(group) == self.prefill_rows:
                self._prefill(slots, owners, group)
                group = []
            if not until_full:
                wait_s, deadline = 0.0, time.monotonic()  # one wait per call, then only what is already here
        if group:
            self._prefill(slots, owners, group)

    def _prefill(self, slots: Any, owners: dict[int, GenerationRequest],
                 group: list[tuple[int, GenerationRequest]]) -> None:
        try:
            slots.admit_many([s for s, _ in group], [r.prompt for _, r in group], [r.sampling for _, r in group])
        except Exception:  # find the request that failed: the others are admitted on their own
            log.exception("prefill failed; admitting the requests one by one")
            for slot, req in group:
                if slot not in slots.free_slots():  # admitted by a prefill call before the one that failed
                    owners[slot] = req
                    continue
                try:
                    slots.admit(slot, req.prompt, req.sampling)
                except Exception as exc:
                    log.exception("prefill failed")
                    self._close(req, Event("error", message=f"generation failed: {type(exc).__name__}: {exc}"))
                    continue
                owners[slot] = req
            return
        owners.update(group)

    def _cancel(self, slots: Any, owners: dict[int, GenerationRequest]) -> None:
        for slot, req in list(owners.items()):
            if self._stop.is_set() or req.cancelled.is_set():
                slots.release(slot)
                self._close(owners.pop(slot), Event("finish", reason="cancelled"))

    def _hand_out(self, results: dict[int, tuple[list[int], str | None]],
                  owners: dict[int, GenerationRequest]) -> None:
        """Give each request its tokens from a collected chunk; close the finished ones."""
        if not results:
            return
        with self._lock:
            self._batches_run += 1
            self._max_batch_seen = max(self._max_batch_seen, len(results))
        for slot, (tokens, reason) in results.items():
            req = owners[slot]
            if tokens:
                with self._lock:
                    self._tokens += len(tokens)
                req.emit(Event("tokens", tokens=tuple(tokens)))
            if reason is not None:
                self._close(owners.pop(slot), Event("finish", reason=reason))

    def _close(self, req: GenerationRequest, last_event: Event) -> None:
        # Counted before the last event goes out, so a client that has its answer already sees itself in
        # stats().
        with self._lock:
            self._requests_done += 1
        req.emit(last_event)

    def _fail_waiting(self, message: str) -> None:
        waiting: list[GenerationRequest] = []
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for req in waiting:
            req.emit(Event("error", message=message))
