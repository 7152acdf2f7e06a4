"""The OpenAI wire format: request validation, error bodies, response and stream-chunk shapes.

Pure functions and pydantic models, no Ray or torch, so the protocol is unit-tested without a server. Only
the fields we implement are accepted with meaning; unknown fields are ignored, as OpenAI's server does.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


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


INT64 = 2**63
# Fields of OpenAI's request schemas this server does not implement, with the values that mean "not used": a
# request that uses one gets a 400 naming it, never a silent default.
_OFF = {
    "tools": lambda v: not v, "tool_choice": lambda v: v in ("none", "auto"), "functions": lambda v: not v,
    "function_call": lambda v: v == "none", "logit_bias": lambda v: not v, "audio": lambda v: not v,
    "modalities": lambda v: v in (["text"], []), "prediction": lambda v: not v,
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
    "web_search_options": lambda v: not v, "best_of": lambda v: v in (0, 1), "suffix": lambda v: not v,
}


class _Params(BaseModel):
    # allow_inf_nan=False: JSON's NaN/Infinity literals (which the parser accepts) are not numbers to sample with.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)  # strict: "yes" is no bool
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # OpenAI's schema: a 64-bit signed integer
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1)  # the server's limit (serve.max_choices) is checked by the ingress
    ignore_eos: bool = False  # extension (as in vLLM): always generate max_tokens; for benchmarks

    @model_validator(mode="before")
    @classmethod
    def _explicit_fields(cls, data: Any) -> Any:
        """null means "the default" (clients send it for unset fields); known but unimplemented fields: 400."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        for name, off in _OFF.items():
            if name in data and not off(data[name]):
                raise PydanticCustomError("unsupported", f"{name}: not supported by this server")
        return data

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
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"unsupported content part {part.get('type')!r}: text parts only", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def messages_for_template(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_budget(self) -> int | None:
        budget = self.max_completion_tokens or self.max_tokens
        if budget == 0:
            raise bad_request("max_tokens: must be >= 1", "max_tokens")
        return budget

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token or None, the same for prompt tokens)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(_Params):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise bad_request("prompt: must not be empty", "prompt")
        return prompts

    def token_budget(self) -> int | None:
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: 0 needs echo: true (prompt log-probs only)", "max_tokens")
        return self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None


def parse_request(raw: bytes, model_cls: type[_Params], max_body_bytes: int) -> _Params:
    """Bytes of a POST body -> a validated request; every failure is an APIError naming the problem. pydantic's
    own JSON parser bounds what plain ``json.loads`` does not: nesting depth, number size, lone surrogates."""
    if len(raw) > max_body_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {max_body_bytes}", param=None,
                       code="request_too_large")
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise bad_request(f"request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request("request body must be a JSON object") from None
        if first["type"] == "unsupported":
            param = first["msg"].split(":")[0]
            raise bad_request(first["msg"], param, "unsupported_parameter") from None
        param = ".".join(str(p) for p in first["loc"][:1]) or None
        raise bad_request(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", param) from None


def check_token_limits(prompt_tokens: int, max_tokens: int | None, max_prompt: int, max_new: int) -> int:
    """Validate lengths against the server's limits; return the max_tokens to use."""
    if prompt_tokens > max_prompt:
        raise bad_request(f"the prompt has {prompt_tokens} tokens; this server accepts at most {max_prompt}",
                          "messages", "context_length_exceeded")
    if max_tokens is not None and max_tokens > max_new:
        raise bad_request(f"max_tokens: {max_tokens} exceeds this server's limit of {max_new}", "max_tokens")
    return max_new if max_tokens is None else max_tokens


# ---- responses -----------------------------------------------------------------------------------------------
# A choice's log-probs arrive from the engine as (token id, log-prob or None, [(alt id, log-prob)]) entries;
# ``info(token id)`` gives the token's (text, UTF-8 bytes).

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list, info) -> dict:
    def one(tok: int, lp: float) -> dict:
        text, raw = info(tok)
        return {"token": text, "logprob": lp, "bytes": raw}
    return {"content": [{**one(tok, lp), "top_logprobs": [one(a, alp) for a, alp in alts]}
                        for tok, lp, alts in entries], "refusal": None}


def completion_logprobs(entries: list, info, offset: int) -> dict:
    """The legacy completions shape; ``offset``: where the first entry's text starts in the choice's text. The
    first token of an echoed prompt has no log-prob (null), as in OpenAI's API; lm-eval counts on that."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, alts in entries:
        text = info(tok)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else {info(a)[0]: alp for a, alp in [(tok, lp), *alts]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": finish, "logprobs": logprobs}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """choices: [{"index", "delta", "finish_reason", "logprobs"}]; the usage chunk has none."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def sse(data: dict | str) -> str:
    """One server-sent event; the stream ends with ``sse("[DONE]")``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "raylm"}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}
