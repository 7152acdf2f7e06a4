"""The served model's tokenizer over HTTP, in vLLM's shapes: ``GET /tokenizer_info``, ``POST /tokenize``,
``POST /detokenize``.

Why: a client that scores log-likelihoods through ``/v1/completions`` must count the tokens of a context itself
(lm-evaluation-harness's ``local-completions`` does), so it needs the served model's tokenizer. With these routes
(the ones vLLM serves, which lm-eval's ``tokenizer_backend=remote`` detects and uses) an endpoint can be evaluated
from a machine that holds no copy of the model. They sit at the server root, as vLLM's do, behind the API key.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from serve import openai_api as oa


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def tokenizer_info(tokenizer, max_model_len: int) -> dict:
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template, "model_max_length": max_model_len,
            "vocab_size": len(tokenizer)}


def add_tokenizer_routes(app: FastAPI, ing) -> None:
    """``ing``: the OpenAIIngress replica (its tokenizer, limits, key check and served model name)."""

    def check_model(name: str | None) -> None:
        if name is not None and name != ing.cfg.model_name:
            raise oa.APIError(404, f"the model {name!r} does not exist", "invalid_request_error", "model",
                              "model_not_found")

    @app.get("/tokenizer_info")
    async def info(request: Request):
        ing.check_auth(request)
        return tokenizer_info(ing.tokenizer, ing.max_model_len)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        ing.check_auth(request)
        req = oa.parse_request(await request.body(), TokenizeRequest, ing.cfg.max_body_bytes)
        check_model(req.model)
        tokens = ing.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": ing.max_model_len, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ing.check_auth(request)
        req = oa.parse_request(await request.body(), DetokenizeRequest, ing.cfg.max_body_bytes)
        check_model(req.model)
        if any(not 0 <= t < ing.vocab_size for t in req.tokens):
            raise oa.bad_request(f"tokens: token ids must be in 0..{ing.vocab_size - 1}", "tokens")
        return {"prompt": ing.tokenizer.decode(req.tokens)}
