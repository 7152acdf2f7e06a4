"""The OpenAI wire format: request validation, error bodies, response and stream-chunk shapes.

Pure functions and pydantic models, no Ray or torch, so the protocol is unit-tested without a server. Only
the fields we implement are accepted with meaning; unknown fields are ignored, as OpenAI's server does.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error that becomes an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, "server_overloaded")


def unavailable(message: str, code: str = "engine_unavailable") -> APIError:
    return APIError(503, message, "service_unavailable", None, code)


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request: batching gives throughput, not n
    ignore_eos: bool = False  # extension (as in vLLM): always generate max_tokens; for benchmarks

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("at most 4 stop sequences", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise bad_request(f"unsupported content part type {part.get('type')!r}: text only", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)

    def messages_for_template(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Params):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise bad_request("prompt: exactly one prompt per request", "prompt")
            return self.prompt[0]
        return self.prompt


def parse_request(raw: bytes, model_cls: type[_Params], max_body_bytes: int) -> _Params:
    """Bytes of a POST body -> a validated request; every failure is an APIError naming the problem."""
    if len(raw) > max_body_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {max_body_bytes}", param=None,
                       code="request_too_large")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}", param) from None


def check_token_limits(prompt_tokens: int, max_tokens: int | None, max_prompt: int, max_new: int) -> int:
    """Validate lengths against the server's limits; return the max_tokens to use."""
    if prompt_tokens > max_prompt:
        raise bad_request(f"the prompt has {prompt_tokens} tokens; this server accepts at most {max_prompt}",
                          "messages", "context_length_exceeded")
    if max_tokens is not None and max_tokens > max_new:
        raise bad_request(f"max_tokens: {max_tokens} exceeds this server's limit of {max_new}", "max_tokens")
    return max_tokens or max_new


# ---- responses -----------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage_}


def completion_response(rid: str, model: str, text: str, finish: str, usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage_}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, usage_: dict | None = None) -> dict:
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(rid: str, model: str, text: str, finish: str | None, usage_: dict | None = None) -> dict:
    choices = [] if usage_ is not None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def sse(data: dict | str) -> str:
    """One server-sent event; the stream ends with ``sse("[DONE]")``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "raylm"}]}
