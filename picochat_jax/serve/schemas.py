"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error shape.

Pydantic checks types and ranges in strict mode (`"10"` or `true` for an integer is a 400 naming the field,
not a silent 10 or 1; its errors become 400s in app.py); `check_supported` rejects the OpenAI options this
server does not implement, so a client never silently gets something other than it asked for. Unknown fields
are ignored, as clients send vendor extensions freely.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error a client can act on, rendered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Strict: no coercion of strings, bools or floats into other types (an int is still a valid float).
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "the default"."""

    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but vLLM-style clients send it
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops or None

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised to a list by the validator

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. A prompt is text, token ids, or a list of either (one choice each). `echo` returns
    the prompt before the completion (with `max_tokens: 0`, the prompt alone) and `logprobs: N` the log-probability
    of every returned token with the N most likely alternatives: what evaluators score choices with."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = None

    def prompt_list(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]  # required: this server has no tool calls that would stand in for it

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def check_supported(req: _Sampling) -> None:
    """400 for OpenAI options this server does not implement (rather than silently ignoring them)."""
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n} is not supported: this server returns exactly one choice per prompt "
                            "(send the request several times with different seeds instead)", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (only 0)", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
        if req.stream and (req.echo or req.logprobs is not None):
            raise APIError(400, "echo and logprobs are not supported with stream; send the request without "
                                "stream", param="stream")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of} is not supported (only 1)", param="best_of")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.logprobs and req.stream:
            raise APIError(400, "logprobs is not supported with stream; send the request without stream",
                           param="stream")
        if req.tools:
            raise APIError(400, "tools / function calling is not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


class TokenizeRequest(BaseModel):
    """POST /tokenize: text (`prompt`) or chat `messages` (rendered with the generation prompt) to token ids."""

    model_config = REQUEST_CONFIG
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`: the BOS (or whatever the tokenizer adds) that completions use


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids to text."""

    model_config = REQUEST_CONFIG
    model: str | None = None
    tokens: list[int]
