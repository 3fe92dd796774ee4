"""OpenAI-compatible HTTP API (FastAPI) over the batcher: /v1/models, /v1/completions, /v1/chat/completions.

    backend = load_backend(checkpoint=Path("RUN/sft/checkpoint"))
    uvicorn.run(create_app(backend), host="127.0.0.1", port=8000)

Every error a client causes is a 4xx with OpenAI's error JSON; FastAPI's own 422 validation answers are
replaced by 400s of that shape. A body over `max_request_bytes` is answered 413 before the rest is read, and
tokenizing and detokenizing run in worker threads, so one huge or slow request never stalls `/health` or other
clients. Message contents are encoded as text: control tokens come only from the chat template. Text is
decoded as token chunks arrive from the worker:
stop strings cut the reply there (and cancel the row), and streams hold back the last few characters that
could still turn out to be the start of a stop string, so a stream never emits text past a stop.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat_jax.config import ServeConfig
from picochat_jax.data.records import Message
from picochat_jax.generate import SamplingParams
from picochat_jax.serve.batcher import Batcher, Event, GenerationRequest, Overloaded, ShuttingDown
from picochat_jax.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_supported,
    error_body,
)

# OpenAI's defaults where a request leaves a field out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


DEFAULTS = ServeConfig()  # mirrors configs/base.yaml serve: (tests/test_config.py keeps them equal)


@dataclass
class Backend:
    """One served model: its name, chat format (ChatFormat protocol of generate.py), batcher and request limits."""

    model_id: str
    fmt: Any
    batcher: Batcher
    default_max_tokens: int = DEFAULTS.default_max_tokens
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "picochat"
    max_request_bytes: int = DEFAULTS.max_request_bytes  # larger bodies get 413
    max_prompt_tokens: int | None = DEFAULTS.max_prompt_tokens  # per request (all its prompts); None = the context

    @property
    def max_context(self) -> int:
        return self.batcher.max_len


def load_backend(checkpoint: Path | None = None, tokenizer: Path | None = None, hf_model: str | Path | None = None,
                 *, model_name: str | None = None, precision: str = DEFAULTS.precision, max_len: int | None = None,
                 max_batch: int = DEFAULTS.max_batch, chunk_tokens: int = DEFAULTS.chunk_tokens,
                 batch_wait_ms: float = DEFAULTS.batch_wait_ms, default_max_tokens: int = DEFAULTS.default_max_tokens,
                 max_queue: int = DEFAULTS.max_queue, warmup: bool = True,
                 max_request_bytes: int = DEFAULTS.max_request_bytes,
                 max_prompt_tokens: int | None = DEFAULTS.max_prompt_tokens,
                 hf_max_len: int = DEFAULTS.hf_max_len) -> Backend:
    """A Backend for a native checkpoint folder (+ tokenizer.json) or a Hugging Face model folder."""
    if (checkpoint is None) == (hf_model is None):
        raise ValueError("give exactly one of a native checkpoint (--checkpoint) or an HF model folder (--hf-model)")
    if checkpoint is not None:
        from picochat_jax.generate import load_native

        engine, fmt = load_native(Path(checkpoint), tokenizer, precision=precision, max_len=max_len,
                                  max_batch=max_batch, chunk_tokens=chunk_tokens)
        name = model_name or "picochat"
    else:
        try:
            from picochat_jax.hf.chat_format import load_hf_chat
        except ImportError as exc:  # the HF bridge is optional for native-only installs
            raise ValueError(f"--hf-model needs the HF bridge (picochat_jax.hf), which failed to import: {exc}") \
                from exc
        engine, fmt = load_hf_chat(hf_model, precision=precision, max_len=max_len, max_batch=max_batch,
                                   default_max_len=hf_max_len, chunk_tokens=chunk_tokens)
        name = model_name or Path(str(hf_model)).name
    batcher = Batcher(engine, fmt.stop_ids, batch_wait_s=batch_wait_ms / 1000.0, max_queue=max_queue)
    if warmup:
        batcher.warmup(fmt.encode_text("hi"))
    return Backend(name, fmt, batcher, default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes,
                   max_prompt_tokens=max_prompt_tokens)


# ------------------------------------------------------------------------------------------ text and stops


class StopText:
    """Incremental detokenizer for one reply that cuts at the first stop string.

    `add` returns the text that is safe to show now; `finish` returns the rest. Their concatenation is
    the whole reply cut at the first stop string, whatever the chunking, so a stream's deltas add up to
    exactly the non-streamed text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = [s for s in stops if s]
        # A stop string that starts in the last len-1 characters may still be completed by the next tokens.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _cut(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return max(min(hits), self.emitted) if hits else None

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        cut = self._cut(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, cut)
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # a multi-byte character not yet complete
            safe -= 1
        return self._emit(text, max(self.emitted, min(safe, len(text) - self.holdback)))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        cut = self._cut(text)
        self.stopped = cut is not None
        return self._emit(text, len(text) if cut is None else cut)

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
        self.completion_tokens = 0
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
                    self.completion_tokens += len(event.tokens)
                    delta = await asyncio.to_thread(text.add, event.tokens)
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
                    tail = await asyncio.to_thread(text.finish)
                    yield Piece(index, tail, "stop" if text.stopped else event.reason or "stop")
                else:
                    raise APIError(500, event.message or "generation failed", type="server_error")
        finally:
            self.cancel()  # no-op for finished rows; frees the batch slot when a client goes away mid-stream

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


# ------------------------------------------------------------------------------------------ request handling


def _sampling(req: Any, token_limit: int | None, prompt_lens: Sequence[int], backend: Backend) -> SamplingParams:
    """Row settings for a request; 400 when the prompt plus max_tokens does not fit the context."""
    ctx = backend.max_context
    longest = max(prompt_lens)
    if longest >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has {longest} "
                            f"tokens, which leaves no room for a reply. Shorten the prompt.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    if token_limit is None:
        max_new = min(backend.default_max_tokens, ctx - longest)  # left out: whatever room the context has
    else:
        if longest + token_limit > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{longest + token_limit} tokens ({longest} in the prompt, {token_limit} for the "
                                f"completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        max_new = token_limit
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    return SamplingParams(max_new_tokens=max_new, temperature=temperature,
                       top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                       seed=secrets.randbits(32) if req.seed is None else req.seed)


def _check_prompt_budget(req: Any, prompts: Sequence[Sequence[int]], backend: Backend) -> None:
    """400 when a request's prompts together exceed the server's per-request prompt-token limit."""
    limit = backend.max_prompt_tokens
    total = sum(len(p) for p in prompts)
    if limit is not None and total > limit:
        raise APIError(400, f"The request's prompts have {total} tokens; this server accepts at most {limit} prompt "
                            "tokens per request (--max-prompt-tokens).",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="prompt_too_long")


def _check_model(req: Any, backend: Backend) -> None:
    if req.model != backend.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")


def _encode_chat(req: ChatCompletionRequest, backend: Backend) -> list[int]:
    # Native templates know system/user/assistant/tool; OpenAI's newer "developer" role is a system prompt.
    messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
    try:
        return list(backend.fmt.encode_prompt(messages))
    except Exception as exc:
        raise APIError(400, f"could not render the messages with the model's chat template: {exc}",
                       param="messages") from exc


def _encode_completion(req: CompletionRequest, backend: Backend) -> list[list[int]]:
    vocab = backend.batcher.engine.model_cfg.vocab_size
    prompts = []
    for p in req.prompt_list():
        if isinstance(p, str):
            prompts.append(list(backend.fmt.encode_text(p)))
        else:
            if not p or any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"token-id prompts must be non-empty with ids in [0, {vocab})", param="prompt")
            prompts.append([int(t) for t in p])
    if any(not p for p in prompts):
        raise APIError(400, "prompt encodes to no tokens", param="prompt")
    return prompts


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _stream(run: ChoiceRun, chunk: Callable[[Piece | None], dict[str, Any]], first: list[dict[str, Any]],
            usage_chunk: Callable[[], dict[str, Any]] | None) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for payload in first:
            yield _sse(payload)
        try:
            async for piece in run.pieces():
                if piece.text or piece.finish_reason:
                    yield _sse(chunk(piece))
            if usage_chunk is not None:
                yield _sse(usage_chunk())
        except APIError as exc:  # headers are sent: the error travels as an event, as OpenAI's does
            yield _sse(exc.body())
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(run: ChoiceRun, n: int) -> tuple[list[str], list[str]]:
    texts, reasons = [""] * n, ["length"] * n
    async for piece in run.pieces():
        texts[piece.index] += piece.text
        if piece.finish_reason:
            reasons[piece.index] = piece.finish_reason
    return texts, reasons


def create_app(backend: Backend) -> FastAPI:
    """The ASGI app. Its lifespan starts the backend's batcher and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(backend.batcher.close)

    app = FastAPI(title="picochat-jax", version="1", lifespan=lifespan)
    app.state.backend = backend
    app.add_middleware(BodySizeLimit, max_bytes=backend.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return JSONResponse(error_body(f"The request body is not valid JSON ({detail}); send a JSON object "
                                           "with Content-Type: application/json.", code="invalid_json"),
                                status_code=400)
        if first.get("type") in ("model_attributes_type", "dict_type") and tuple(first.get("loc", ())) == ("body",):
            return JSONResponse(error_body("The request body must be a JSON object.", code="invalid_json"),
                                status_code=400)
        problems = list(dict.fromkeys(_describe(e) for e in errors))
        message = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        param = _param(first.get("loc", ())) or None
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = exc.detail if exc.status_code == 413 else f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = backend.batcher.stats()
        return {"status": "ok", "model": backend.model_id, "max_context": backend.max_context,
                "batches_run": stats.batches_run, "max_batch_seen": stats.max_batch_seen,
                "requests_done": stats.requests_done, "tokens_generated": stats.tokens_generated,
                "queued": stats.queued}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(backend)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != backend.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card(backend)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        _check_model(req, backend)
        check_supported(req)
        prompts = await asyncio.to_thread(_encode_completion, req, backend)
        _check_prompt_budget(req, prompts, backend)
        sampling = _sampling(req, req.max_tokens, [len(p) for p in prompts], backend)
        run = ChoiceRun(backend, prompts, sampling, req.stop_strings)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": backend.model_id}
        if req.stream:
            def chunk(piece: Piece | None) -> dict[str, Any]:
                return {**base, "choices": [{"index": piece.index, "text": piece.text, "logprobs": None,
                                             "finish_reason": piece.finish_reason}]}

            usage = (lambda: {**base, "choices": [], "usage": run.usage()}) if req.wants_usage_chunk else None
            return _stream(run, chunk, [], usage)
        texts, reasons = await _collect(run, len(prompts))
        return {**base, "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                                    for i, (t, r) in enumerate(zip(texts, reasons, strict=True))], "usage": run.usage()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        _check_model(req, backend)
        check_supported(req)
        prompt = await asyncio.to_thread(_encode_chat, req, backend)
        _check_prompt_budget(req, [prompt], backend)
        sampling = _sampling(req, req.token_limit, [len(prompt)], backend)
        run = ChoiceRun(backend, [prompt], sampling, req.stop_strings)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": backend.model_id}
        if req.stream:
            def chunk(piece: Piece | None) -> dict[str, Any]:
                delta = {"content": piece.text} if piece.text else {}
                return {**base, "choices": [{"index": piece.index, "delta": delta, "logprobs": None,
                                             "finish_reason": piece.finish_reason}]}

            role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
            usage = (lambda: {**base, "choices": [], "usage": run.usage()}) if req.wants_usage_chunk else None
            return _stream(run, chunk, [role], usage)
        texts, reasons = await _collect(run, 1)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                             "finish_reason": reasons[0]}],
                "usage": run.usage()}

    return app


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`.

    A declared Content-Length over the limit is refused before one body byte is read; a chunked body is
    counted as it arrives and refused the moment it passes the limit, so nobody can make the server buffer
    (and then parse on the event loop) more than `max_bytes`.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"The request body is {size}, over this server's limit of {self.max_bytes:,} bytes "
                "(--max-request-bytes).")

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(self._message(f"{int(declared):,} bytes"),
                                               code="request_too_large"), status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, because FastAPI turns any other error while reading a body into 400.
                    raise StarletteHTTPException(413, detail=self._message(f"over {received:,} bytes"))
            return message

        await self.app(scope, limited_receive, send)


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _param(loc: Sequence[Any]) -> str:
    """'messages[0].content' from pydantic's ('body', 'messages', 0, 'content', 'str'), union tags dropped."""
    out = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: dict[str, Any]) -> str:
    param = _param(error.get("loc", ()))
    if error.get("type") == "missing":
        return f"Missing required parameter: '{param}'" if param else "The request body is missing"
    return f"Invalid value for '{param}': {error.get('msg')}" if param else str(error.get("msg"))


def _model_card(backend: Backend) -> dict[str, Any]:
    return {"id": backend.model_id, "object": "model", "created": backend.created, "owned_by": backend.owned_by,
            "max_model_len": backend.max_context}
