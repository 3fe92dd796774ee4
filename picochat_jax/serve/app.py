"""OpenAI-compatible HTTP API (FastAPI) over the batcher: /v1/models, /v1/completions, /v1/chat/completions
(with echo and logprobs, for evaluators such as lm-evaluation-harness), /tokenize and /detokenize.

    backend = load_backend(checkpoint=Path("RUN/sft/checkpoint"))      # serve/backend.py
    uvicorn.run(create_app(backend), host="127.0.0.1", port=8000)

Every error a client causes is a 4xx with OpenAI's error JSON; FastAPI's own 422 validation answers are
replaced by 400s of that shape. A body over `max_request_bytes` is answered 413 before the rest is read, and
tokenizing and detokenizing run in worker threads, so one huge or slow request never stalls `/health` or other
clients. Message contents are encoded as text: control tokens come only from the chat template. Replies become
text in serve/text.py (stop strings, stream hold-back).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat_jax.data.records import Message
from picochat_jax.generate import SamplingParams, TokenScores
from picochat_jax.serve.backend import Backend
from picochat_jax.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_supported,
    error_body,
)
from picochat_jax.serve.text import ChoiceRun, Piece

# OpenAI's defaults where a request leaves a field out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


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


def _token_text(backend: Backend, token: int) -> str:
    return backend.fmt.decode([token])


def _completion_logprobs(backend: Backend, scores: TokenScores, start: int, offset: int) -> dict[str, Any]:
    """OpenAI's completion `logprobs` object for tokens[start:] of a scored sequence; text offsets from
    `offset` (0 with echo, else the prompt's length in characters)."""
    tokens = [_token_text(backend, t) for t in scores.tokens[start:]]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top = [None if alts is None else {_token_text(backend, t): lp for t, lp in reversed(alts)}
           for alts in scores.top[start:]]
    return {"tokens": tokens, "token_logprobs": scores.logprobs[start:], "top_logprobs": top,
            "text_offset": offsets}


async def _complete(req: CompletionRequest, backend: Backend) -> Any:
    """POST /v1/completions: text or token-id prompts, one choice each, plain or streamed; with echo and/or
    logprobs, the prompt's and the completion's token log-probabilities from one batched scoring pass."""
    _check_model(req, backend)
    check_supported(req)
    prompts = await asyncio.to_thread(_encode_completion, req, backend)
    _check_prompt_budget(req, prompts, backend)
    base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": backend.model_id}
    scoring = bool(req.echo) or req.logprobs is not None
    if req.max_tokens == 0:  # echo alone: score the prompts, generate nothing
        longest = max(len(p) for p in prompts)
        if longest > backend.max_context:
            raise APIError(400, f"This model's maximum context length is {backend.max_context} tokens, but the "
                                f"prompt has {longest} tokens.", param="prompt", code="context_length_exceeded")
        texts, reasons, generated = [""] * len(prompts), ["length"] * len(prompts), [[] for _ in prompts]
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                 "total_tokens": sum(map(len, prompts))}
    else:
        sampling = _sampling(req, req.max_tokens, [len(p) for p in prompts], backend)
        run = ChoiceRun(backend, prompts, sampling, req.stop_strings)
        if req.stream:
            def chunk(piece: Piece) -> dict[str, Any]:
                return {**base, "choices": [{"index": piece.index, "text": piece.text, "logprobs": None,
                                             "finish_reason": piece.finish_reason}]}

            usage_chunk = (lambda: {**base, "choices": [], "usage": run.usage()}) if req.wants_usage_chunk else None
            return _stream(run, chunk, [], usage_chunk)
        texts, reasons = await _collect(run, len(prompts))
        generated, usage = run.ids, run.usage()
    if not scoring:
        return {**base, "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                                    for i, (t, r) in enumerate(zip(texts, reasons, strict=True))], "usage": usage}
    sequences = [p + g for p, g in zip(prompts, generated, strict=True)]
    scored = await asyncio.to_thread(backend.batcher.engine.score, sequences, req.logprobs or 0)
    choices = []
    for i, prompt in enumerate(prompts):
        prompt_text = await asyncio.to_thread(backend.fmt.decode, prompt) if req.echo else ""
        start = 0 if req.echo else len(prompt)
        offset = 0 if req.echo else len(await asyncio.to_thread(backend.fmt.decode, prompt))
        logprobs = _completion_logprobs(backend, scored[i], start, offset) if req.logprobs is not None else None
        choices.append({"index": i, "text": prompt_text + texts[i], "logprobs": logprobs,
                        "finish_reason": reasons[i]})
    return {**base, "choices": choices, "usage": usage}


def _chat_logprobs(backend: Backend, scores: TokenScores, start: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object ({"content": [...]}) for the reply tokens tokens[start:]."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(backend, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, logprob, alts in zip(scores.tokens[start:], scores.logprobs[start:], scores.top[start:],
                                    strict=True):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alts or []]})
    return {"content": content}


async def _chat_complete(req: ChatCompletionRequest, backend: Backend) -> Any:
    """POST /v1/chat/completions: one reply to the messages, plain or streamed."""
    _check_model(req, backend)
    check_supported(req)
    prompt = await asyncio.to_thread(_encode_chat, req, backend)
    _check_prompt_budget(req, [prompt], backend)
    sampling = _sampling(req, req.token_limit, [len(prompt)], backend)
    run = ChoiceRun(backend, [prompt], sampling, req.stop_strings)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": backend.model_id}
    if req.stream:
        def chunk(piece: Piece) -> dict[str, Any]:
            delta = {"content": piece.text} if piece.text else {}
            return {**base, "choices": [{"index": piece.index, "delta": delta, "logprobs": None,
                                         "finish_reason": piece.finish_reason}]}

        role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
        usage = (lambda: {**base, "choices": [], "usage": run.usage()}) if req.wants_usage_chunk else None
        return _stream(run, chunk, [role], usage)
    texts, reasons = await _collect(run, 1)
    logprobs = None
    if req.logprobs:
        scored = await asyncio.to_thread(backend.batcher.engine.score, [prompt + run.ids[0]], req.top_logprobs or 0)
        logprobs = _chat_logprobs(backend, scored[0], len(prompt))
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": logprobs,
                         "finish_reason": reasons[0]}],
            "usage": run.usage()}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's {"error": {...}}: client errors 4xx (FastAPI's 422s become 400s), the rest 500."""

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


def create_app(backend: Backend, api_key: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The ASGI app. Its lifespan starts the backend's batcher and closes it on shutdown. With `api_key`, every
    route needs `Authorization: Bearer KEY` (401 otherwise); `cors_origins` lets those browser origins call it."""

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
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:  # outermost, so a browser's preflight OPTIONS is answered without credentials
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_error_handlers(app)

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
        return await _complete(req, backend)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        return await _chat_complete(req, backend)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.model is not None:
            _check_model(req, backend)
        if req.prompt is not None:
            tokens = await asyncio.to_thread(backend.fmt.encode_text, req.prompt, req.add_special_tokens)
        else:
            tokens = await asyncio.to_thread(_encode_chat, req, backend)
        return {"tokens": list(tokens), "count": len(tokens), "max_model_len": backend.max_context}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """The special tokens and context (vLLM's endpoint: lm-evaluation-harness tokenizes through it)."""
        return {**backend.fmt.special_tokens(), "model_max_length": backend.max_context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            _check_model(req, backend)
        vocab = backend.batcher.engine.model_cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(backend.fmt.decode, req.tokens)}

    return app


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <api key>`, else 401 in OpenAI's error
    shape. The key is compared in constant time."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
        body = json.dumps(error_body(message, code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


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
