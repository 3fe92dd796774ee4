"""Replies as text: token chunks from the batcher's worker become text pieces on the event loop.

Detokenizing is incremental and runs on the event loop: each chunk decodes only its new tokens and a few before
them, so a chunk costs microseconds however long the reply. Stop strings cut the reply there (and cancel the
row), and streams hold back the last few characters that could still turn out to be the start of a stop string,
so a stream never emits text past a stop and its deltas add up to exactly the non-streamed text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from picochat_jax.generate import SamplingParams
from picochat_jax.serve.backend import Backend
from picochat_jax.serve.batcher import Event, GenerationRequest, Overloaded, ShuttingDown
from picochat_jax.serve.schemas import APIError


class StopText:
    """Incremental detokenizer for one reply that cuts at the first stop string.

    `add` returns the text that is safe to show now; `finish` returns the rest. Their concatenation is
    the whole reply cut at the first stop string, whatever the chunking, so a stream's deltas add up to
    exactly the non-streamed text.

    The text grows by decoding ids[_prefix:] against ids[_prefix:_read] (the tokens already in the text from
    the last step): the difference is the new tokens' text as the whole decode renders it, also for
    tokenizers that render a token differently at the start of a sequence (a leading space) or split a
    character over tokens. The window stays put while its text ends in an incomplete character. Decoding
    the whole reply for each chunk instead cost O(length) a chunk, and was sent to a thread for it; with 64
    streams those hand-offs held up the batcher's worker (docs/serving.md).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = [s for s in stops if s]
        # A stop string that starts in the last len-1 characters may still be completed by the next tokens.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []  # the reply's ids; once cut at a stop string, only those its text needs
        self.text = ""  # the text of ids[:_read]
        self._prefix = self._read = 0
        self.emitted = 0
        self.stopped = False

    def _decode(self, final: bool) -> str:
        """The reply's text so far. The new ids' text joins `text` (and the window moves on) once it ends in a
        complete character, or at the reply's end; until then it is returned after `text`, trailing
        replacement characters and all, for `add` to hold the incomplete end back."""
        if self._read == len(self.ids):
            return self.text
        known = self.decode(self.ids[self._prefix:self._read])
        new = self.decode(self.ids[self._prefix:])[len(known):]
        if final or (new and not new.endswith("\ufffd")):
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
            return self.text
        return self.text + new

    def _cut(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return max(min(hits), self.emitted) if hits else None

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._decode(final=False)
        cut = self._cut(text)
        if cut is not None:
            self._stop(text[:cut])
            return self._emit(text, cut)
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # a multi-byte character not yet complete
            safe -= 1
        return self._emit(text, max(self.emitted, min(safe, len(text) - self.holdback)))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self._decode(final=True)
        cut = self._cut(text)
        if cut is not None:
            self._stop(text[:cut])
        return self._emit(text, len(text) if cut is None else cut)

    def _stop(self, kept: str) -> None:
        """Cut the reply at a stop string: `ids` keeps the fewest ids whose text still holds `kept`, everything
        before the stop (a token that straddles the cut stays). The ids after them were decoded in the same
        chunk but are not part of the reply (its logprobs and usage)."""
        self.stopped = True
        while self.ids and self.decode(self.ids[:-1]).startswith(kept):
            self.ids.pop()

    def _emit(self, text: str, end: int) -> str:
        delta = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


@dataclass
class Piece:
    index: int
    text: str
    finish_reason: str | None = None  # set on a choice's last piece: "stop" | "length"


class ChoiceRun:
    """The prompts of one HTTP request in flight on the batcher, read back as text pieces on the event loop."""

    def __init__(self, backend: Backend, prompts: list[list[int]], sampling: SamplingParams, stops: Sequence[str]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.texts = [StopText(backend.fmt.decode, stops) for _ in prompts]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.requests = [GenerationRequest(p, sampling, self._callback(i)) for i, p in enumerate(prompts)]
        try:
            for req in self.requests:
                backend.batcher.submit(req)
        except Overloaded as exc:
            self.cancel()
            raise APIError(503, str(exc), type="server_error", code="overloaded") from exc
        except ShuttingDown as exc:
            self.cancel()
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc

    def _callback(self, index: int) -> Callable[[Event], None]:
        def push(event: Event) -> None:  # worker thread -> event loop
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return push

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Text pieces as they become safe to show; every choice ends with one piece carrying its reason."""
        open_choices = set(range(len(self.requests)))
        try:
            while open_choices:
                index, event = await self.queue.get()
                if index not in open_choices:
                    continue  # a choice already cut at a stop string: its last events don't matter
                text = self.texts[index]
                if event.kind == "tokens":
                    delta = text.add(event.tokens)
                    if text.stopped:
                        self.requests[index].cancel()
                        open_choices.discard(index)
                        yield Piece(index, delta, "stop")
                    elif delta:
                        yield Piece(index, delta)
                elif event.kind == "finish":
                    if event.reason == "cancelled":  # not by us (a stop string closes its choice first)
                        raise APIError(503, "generation was cancelled: the server is shutting down",
                                       type="server_error", code="shutting_down")
                    open_choices.discard(index)
                    tail = text.finish()
                    yield Piece(index, tail, "stop" if text.stopped else event.reason or "stop")
                else:
                    raise APIError(500, event.message or "generation failed", type="server_error")
        finally:
            self.cancel()  # no-op for finished rows; frees the batch slot when a client goes away mid-stream

    @property
    def ids(self) -> list[list[int]]:
        """Each choice's generated ids (for logprobs): after a stop string, only those its text needs."""
        return [text.ids for text in self.texts]

    def usage(self) -> dict[str, int]:
        completion = sum(len(text.ids) for text in self.texts)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}
