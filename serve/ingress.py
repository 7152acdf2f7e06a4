"""The ``OpenAIIngress`` deployment: OpenAI-compatible HTTP routes in front of the ``LLMEngine`` deployment.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health, and the Gradio
demo at /demo. Statuses: 400 bad request, 401 missing/wrong API key, 404 unknown model or route, 413 body too
large, 429 engine queue full (Serve back-pressure), 503 engine unavailable or request timeout, all with
OpenAI-style error bodies.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import from_dict
from cluster.schemas.serve import ServeConfig
from serve import openai_api as oa

REPLICA_FAILED = "replica_failed"
# A request whose engine replica died before its first token is sent again (nothing reached the client yet);
# the router learns of a dead replica only when a call to it fails, so a few may land there after a crash.
ENGINE_ATTEMPTS = 3
LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from the env var named by ``api_key_env``, else the file ``api_key_file``; None: no auth."""
    key = os.environ.get(cfg.api_key_env, "").strip()
    if key:
        return key
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"serve.api_key_file: {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"serve.api_key_file: {path} is empty")
        return key
    return None


def engine_error(exc: BaseException, timeout_s: float) -> oa.APIError:
    """Map what a handle call can raise to the status a client should see."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, oa.APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return oa.overloaded("the server is overloaded (engine queue full); retry later")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return oa.unavailable(f"the request did not finish within {timeout_s:g} s", "timeout")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return oa.unavailable("the engine replica serving this request failed; retry", REPLICA_FAILED)
    if isinstance(exc, DeploymentUnavailableError):
        return oa.unavailable("no engine replica is available; retry later")
    return oa.APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, None)


class _Metrics:
    """Ray's Prometheus metrics (exported by every Ray node's metrics agent)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("raylm_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("raylm_request_latency_s", description="time to the last byte of a completion",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.ttft = Histogram("raylm_time_to_first_token_s", description="time to the first generated text",
                              boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.tokens = Counter("raylm_tokens", description="prompt and completion tokens", tag_keys=("kind",))


@serve.ingress()
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, model_dir: str, cfg: dict):
        from transformers import AutoTokenizer

        self.engine = engine
        self.cfg = from_dict(ServeConfig, cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.api_key = read_api_key(self.cfg)
        self.created = int(time.time())
        self.metrics = _Metrics()
        self.pending = 0  # completions in progress in this replica (one event loop: no lock needed)

    def __serve_build_asgi_app__(self):
        app = build_api(self)
        if self.cfg.demo:
            import gradio as gr

            from serve.ui import build_demo
            api_url = self.cfg.demo_api_url or f"http://127.0.0.1:{self.cfg.port}/v1"
            app = gr.mount_gradio_app(app, build_demo(api_url, self.api_key, self.cfg), path="/demo")
        return app

    # -- request handling --
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise oa.APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                              "invalid_request_error", None, "invalid_api_key")

    def prompt_ids(self, req) -> list[int]:
        if isinstance(req, oa.ChatRequest):
            if not self.tokenizer.chat_template:
                raise oa.bad_request("this model has no chat template: use /v1/completions", "messages")
            ids = self.tokenizer.apply_chat_template(req.messages_for_template(), add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tokenizer.encode(req.prompt_text(), add_special_tokens=True)

    async def engine_stream(self, prompt_ids: list[int], params: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout_s
        gen = None
        try:
            gen = self.engine.options(stream=True).generate.remote({"prompt_ids": prompt_ids, "params": params})
            while True:
                try:
                    delta = await asyncio.wait_for(gen.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                yield delta
        except Exception as exc:
            raise engine_error(exc, self.cfg.request_timeout_s) from exc
        finally:
            if gen is not None:
                gen.cancel()

    async def complete(self, request: Request, kind: str):
        """Admission control first: past ``max_pending_requests`` in this replica, answer 429 at once. (Serve's
        own ``max_queued_requests`` answers a plain-text 503 that bypasses the app's error handlers, and
        rejects early under bursts, so the count that matters to clients is kept here.)"""
        if self.pending >= self.cfg.max_pending_requests:
            raise oa.overloaded(f"the server is overloaded ({self.pending} requests in progress); retry later")
        self.pending += 1
        streaming = False
        try:
            response = await self._complete(request, kind)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:  # a stream releases its slot when it ends (_Stream.sse)
                self.pending -= 1

    async def _complete(self, request: Request, kind: str):
        start = time.perf_counter()
        self.check_auth(request)
        cls = oa.ChatRequest if kind == "chat" else oa.CompletionRequest
        req = oa.parse_request(await request.body(), cls, self.cfg.max_body_bytes)
        if req.model != self.cfg.model_name:
            raise oa.APIError(404, f"the model {req.model!r} does not exist; this server serves "
                              f"{self.cfg.model_name!r}", "invalid_request_error", "model", "model_not_found")
        ids = self.prompt_ids(req)
        max_tokens = oa.check_token_limits(len(ids), req.max_completion_tokens or req.max_tokens,
                                           self.cfg.max_prompt_tokens, self.cfg.max_new_tokens)
        params = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": req.stop_list(), "seed": req.seed, "ignore_eos": req.ignore_eos}
        for attempt in range(1, ENGINE_ATTEMPTS + 1):
            deltas = self.engine_stream(ids, params)
            try:
                first = await deltas.__anext__()  # engine errors before the first token get a real status
                break
            except oa.APIError as exc:
                if exc.code != REPLICA_FAILED or attempt == ENGINE_ATTEMPTS:
                    raise
        self.metrics.ttft.observe(time.perf_counter() - start, tags={"route": kind})
        stream = _Stream(self, kind, req, len(ids), first, deltas, start)
        if req.stream:
            return StreamingResponse(stream.sse(), media_type="text/event-stream")
        return JSONResponse(await stream.whole())


class _Stream:
    """One completion being relayed from the engine: as SSE chunks or as one JSON body."""

    def __init__(self, ingress: OpenAIIngress, kind: str, req, prompt_tokens: int, first: dict, rest, start: float):
        self.ing, self.kind, self.req, self.prompt_tokens = ingress, kind, req, prompt_tokens
        self.first, self.rest, self.start = first, rest, start
        self.rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.model = ingress.cfg.model_name
        self.completion_tokens, self.finish = 0, None
        self.released = False

    def release(self) -> None:
        """Give back the ingress's pending slot (once), when a stream ends or is dropped unread."""
        if not self.released:
            self.released = True
            self.ing.pending -= 1

    def __del__(self):  # a client that leaves before the first byte never starts sse(): free the slot anyway
        if self.req.stream:
            self.release()

    async def deltas(self) -> AsyncIterator[dict]:
        yield self.first
        async for d in self.rest:
            yield d

    def _record(self, d: dict) -> None:
        self.completion_tokens = d["completion_tokens"]
        self.finish = d["finish_reason"] or self.finish

    def _done(self) -> dict:
        m = self.ing.metrics
        m.latency.observe(time.perf_counter() - self.start, tags={"route": self.kind})
        for kind, count in (("prompt", self.prompt_tokens), ("completion", self.completion_tokens)):
            if count > 0:  # Ray's Counter refuses 0 (a reply may end at once with EOS)
                m.tokens.inc(count, tags={"kind": kind})
        return oa.usage(self.prompt_tokens, self.completion_tokens)

    async def whole(self) -> dict:
        parts = []
        async for d in self.deltas():
            parts.append(d["text"])
            self._record(d)
        build = oa.chat_response if self.kind == "chat" else oa.completion_response
        return build(self.rid, self.model, "".join(parts), self.finish or "length", self._done())

    def _chunk(self, text: str | None, finish: str | None, usage: dict | None = None) -> str:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            return oa.sse(oa.chat_chunk(self.rid, self.model, delta, finish, usage))
        return oa.sse(oa.completion_chunk(self.rid, self.model, text or "", finish, usage))

    async def sse(self) -> AsyncIterator[str]:
        try:
            if self.kind == "chat":
                yield oa.sse(oa.chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""}, None))
            async for d in self.deltas():
                self._record(d)
                if d["text"]:
                    yield self._chunk(d["text"], None)
            yield self._chunk(None, self.finish or "length")
            usage = self._done()
            if self.req.include_usage():
                yield self._chunk(None, None, usage)
        except oa.APIError as exc:  # headers are gone: the error travels as an event, as OpenAI's does
            yield oa.sse(exc.body())
        finally:
            self.release()
        yield oa.sse("[DONE]")


def build_api(ing: OpenAIIngress) -> FastAPI:
    """The FastAPI app of one ingress replica (built at replica start: routes close over the replica)."""
    app = FastAPI(title="raylm OpenAI-compatible API", docs_url="/docs", redoc_url=None)

    @app.exception_handler(oa.APIError)
    async def _api_error(_: Request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        err = oa.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          "invalid_request_error", None, code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            ing.metrics.requests.inc(tags={"route": request.url.path, "status": str(response.status_code)})
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": ing.cfg.model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        ing.check_auth(request)
        return oa.models_list(ing.cfg.model_name, ing.created)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        ing.check_auth(request)
        if model_id != ing.cfg.model_name:
            raise oa.APIError(404, f"the model {model_id!r} does not exist", "invalid_request_error", "model",
                              "model_not_found")
        return oa.models_list(ing.cfg.model_name, ing.created)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await ing.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ing.complete(request, "completion")

    return app
