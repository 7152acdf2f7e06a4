"""The ``OpenAIIngress`` deployment: OpenAI-compatible HTTP routes in front of the engine (the hf engine in the
same replica, or the ``LLMEngine`` deployment of ``serve.engine: vllm``; see serve/app.py).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}] (with the model's lineage and
eval summary as extra fields: serve/model_info.py), GET /health, the tokenizer (GET /tokenizer_info, POST
/tokenize, /detokenize: serve/tokenizer_routes.py), the Gradio demo at /demo, and the run report at /report
(when ``serve.report`` names one). Statuses: 400 bad request, 401 missing/wrong API key, 404 unknown model or route, 413 body too
large, 429 engine queue full (Serve back-pressure), 503 engine unavailable or request timeout, all with
OpenAI-style error bodies. A 500 carries only a request id (``x-request-id`` on every response); the details go
to the replica's log under that id.

With an API key set, the key guards everything but /health: the API, FastAPI's /docs and /openapi.json, and the
demo (a login form whose password is the key; the demo then calls the API with the server's key), and the
report (HTTP Basic auth, the key as password, so a browser following the demo's link asks for it).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache, partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import from_dict
from cluster.schemas.serve import ServeConfig
from serve import openai_api as oa
from serve.local_engine import EngineDied
from serve.model_info import ModelInfo
from serve.relay import Choice, Relay, SlotResponse
from serve.sampling import Delta, RequestError, SamplingParams
from serve.tokenizer_routes import add_tokenizer_routes

log = logging.getLogger("ray.serve")

REPLICA_FAILED = "replica_failed"
# A request whose engine replica died before its first token is sent again (nothing reached the client yet);
# the router learns of a dead replica only when a call to it fails, so a few may land there after a crash.
ENGINE_ATTEMPTS = 3
DEMO_MAX_UPLOAD = "64kb"  # the chat demo takes no files; Gradio's upload route stays, bounded (and keyed)
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


def engine_error(exc: BaseException, timeout_s: float, request_id: str = "-") -> oa.APIError:
    """Map what a handle call can raise to the status a client should see; never a traceback or an address."""
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
    if isinstance(exc, EngineDied):
        return oa.unavailable("the engine of the replica serving this request failed; retry")
    if isinstance(exc, DeploymentUnavailableError):
        return oa.unavailable("no engine replica is available; retry later")
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps what the replica raised
    if isinstance(cause, RequestError):  # this request's fault, said plainly
        return oa.bad_request(str(cause).splitlines()[0][:500])
    return internal_error(exc, request_id)


def internal_error(exc: BaseException, request_id: str) -> oa.APIError:
    log.error("request %s failed", request_id, exc_info=exc)
    return oa.APIError(500, f"internal server error (request id {request_id})", "server_error", None, None)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte (printable bytes stand for themselves, the rest are shifted
    past 255). Written here: transformers 5 no longer exports ``bytes_to_unicode``, and ``tokenizers`` exposes
    the alphabet but not the mapping."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def token_info(tokenizer, alphabet: dict[str, int], tok: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token for log-prob entries. The bytes are the token's own, also when it holds
    part of a character (its text then shows U+FFFD), so clients can join them, as OpenAI's ``bytes`` intends."""
    if tok in tokenizer.all_special_ids:
        return "", []
    piece = tokenizer.convert_ids_to_tokens(tok)
    text = tokenizer.decode([tok])
    if piece and all(c in alphabet for c in piece):
        return text, [alphabet[c] for c in piece]
    return text, list(text.encode("utf-8"))


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    def __init__(self, engine: DeploymentHandle | None, model_dir: str, cfg: dict):
        """``engine``: the vLLM engine deployment's handle, or None: run the hf engine in this replica."""
        self.engine = engine
        self.cfg = from_dict(ServeConfig, cfg)
        self.local = None
        if engine is None:
            from serve.local_engine import HFEngine

            c = self.cfg
            self.local = HFEngine(model_dir, c.max_batch_size, c.batch_wait_timeout_s, c.stream_interval)
            self.tokenizer = self.local.tokenizer
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = len(self.tokenizer)
        self.token_info = lru_cache(maxsize=65536)(partial(token_info, self.tokenizer, byte_level_alphabet()))
        self.api_key = read_api_key(self.cfg)
        self.info = ModelInfo(model_dir, self.cfg.max_prompt_tokens)
        self.max_model_len = self.info.max_model_len
        self.created = int(time.time())
        self.metrics = _Metrics()
        self.pending = 0  # completions in progress in this replica (one event loop: no lock needed)
        if self.api_key is None and not is_loopback(self.cfg.host):
            log.warning("serve: the API listens on %s with no API key: anyone who reaches it can generate (set %s "
                        "or serve.api_key_file)", self.cfg.host, self.cfg.api_key_env)

    def check_health(self) -> None:
        if self.local is not None:
            self.local.check_health()

    def __serve_build_asgi_app__(self):
        app = build_api(self)
        if self.cfg.demo:
            import gradio as gr

            from serve.ui import build_demo
            api_url = self.cfg.demo_api_url or f"http://127.0.0.1:{self.cfg.port}/v1"
            guard = {}
            if self.api_key is not None:  # the demo generates with the server's key: only key holders may use it
                guard = {"auth": lambda _user, password: self.key_matches(password),
                         "auth_message": "This server requires its API key: any user name, the key as password."}
            app = gr.mount_gradio_app(app, build_demo(api_url, self.api_key, self.cfg), path="/demo",
                                      max_file_size=DEMO_MAX_UPLOAD, **guard)
        return app

    # -- request handling --
    def key_matches(self, token: str) -> bool:
        return self.api_key is None or hmac.compare_digest(token.encode(), self.api_key.encode())

    def check_report_auth(self, request: Request) -> None:
        """The report page: the key as a Bearer token, or as the password of HTTP Basic auth (any user name, as
        the demo's login form), which a browser asks for by itself on a 401 with ``WWW-Authenticate``."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else ""
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                token = ""
        if not self.key_matches(token):
            raise oa.APIError(401, "the report needs the API key (any user name, the key as password)",
                              "invalid_request_error", None, "invalid_api_key")

    def check_auth(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not self.key_matches(token):
            raise oa.APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                              "invalid_request_error", None, "invalid_api_key")

    def prompt_ids(self, req) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt of the request; 400 for what the tokenizer or model cannot take."""
        if isinstance(req, oa.ChatRequest):
            if not self.tokenizer.chat_template:
                raise oa.bad_request("this model has no chat template: use /v1/completions", "messages")
            try:
                ids = self.tokenizer.apply_chat_template(req.messages_for_template(), add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
            except Exception as exc:  # noqa: BLE001 - a template that rejects these messages (jinja raise)
                raise oa.bad_request(f"messages: the chat template rejected them: {exc}", "messages") from None
            return [("", list(ids["input_ids"] if isinstance(ids, dict) else ids))]
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode(p, add_special_tokens=True)))
            elif all(0 <= t < self.vocab_size for t in p):
                out.append((self.tokenizer.decode(p), list(p)))
            else:
                raise oa.bad_request(f"prompt: token ids must be in 0..{self.vocab_size - 1}", "prompt")
        return out

    async def engine_stream(self, prompt_ids: list[int], params: SamplingParams, deadline: float,
                            request_id: str) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        gen = None
        try:
            if self.local is not None:
                gen = self.local.generate(prompt_ids, params)
            else:
                gen = self.engine.options(stream=True).generate.remote(prompt_ids, params)
            while True:
                try:
                    delta = await asyncio.wait_for(gen.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                yield delta
        except Exception as exc:
            raise engine_error(exc, self.cfg.request_timeout_s, request_id) from exc
        finally:
            if self.local is not None and gen is not None:
                await gen.aclose()  # frees the request's batch row
            elif gen is not None:
                gen.cancel()

    async def open_choice(self, index: int, ids: list[int], params: SamplingParams, deadline: float,
                          request_id: str) -> Choice:
        """Start one choice's engine stream and wait for its first delta, so engine errors before the first token
        get a real status; a replica that died before starting it gets the request again."""
        for attempt in range(1, ENGINE_ATTEMPTS + 1):
            deltas = self.engine_stream(ids, params, deadline, request_id)
            try:
                return Choice(index, await deltas.__anext__(), deltas)
            except oa.APIError as exc:
                if exc.code != REPLICA_FAILED or attempt == ENGINE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def complete(self, request: Request, kind: str):
        """Admission control first: past ``max_pending_requests`` in this replica, answer 429 at once. (Serve's
        own ``max_queued_requests`` answers a plain-text 503 that bypasses the app's error handlers, and
        rejects early under bursts, so the count that matters to clients is kept here.)"""
        if self.pending >= self.cfg.max_pending_requests:
            raise oa.overloaded(f"the server is overloaded ({self.pending} requests in progress); retry later")
        self.pending += 1
        relay = None

        async def release() -> None:  # once, however the request ends
            self.pending -= 1
            if relay is not None:
                await relay.close()
                self._done(kind, relay, request)
        try:
            relay, stream = await self._start(request, kind)
        except BaseException:
            await release()
            raise
        if stream:
            return SlotResponse(relay.sse(), release)
        try:
            return JSONResponse(await relay.whole())
        finally:
            await release()

    async def _start(self, request: Request, kind: str) -> tuple[Relay, bool]:
        request.state.start = time.perf_counter()
        self.check_auth(request)
        cls = oa.ChatRequest if kind == "chat" else oa.CompletionRequest
        req = oa.parse_request(await request.body(), cls, self.cfg.max_body_bytes)
        if req.model != self.cfg.model_name:
            raise oa.APIError(404, f"the model {req.model!r} does not exist; this server serves "
                              f"{self.cfg.model_name!r}", "invalid_request_error", "model", "model_not_found")
        prompts = self.prompt_ids(req)
        if len(prompts) * req.n > self.cfg.max_choices:
            param = "n" if req.n > 1 else "prompt"
            raise oa.bad_request(f"{param}: {len(prompts)} prompt(s) x n={req.n} choices exceed this server's limit "
                                 f"of {self.cfg.max_choices} per request", param)
        budget = req.token_budget()
        for _, ids in prompts:
            max_tokens = oa.check_token_limits(len(ids), budget, self.cfg.max_prompt_tokens, self.cfg.max_new_tokens)
        logprobs, prompt_logprobs = req.logprob_counts()
        params = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": req.stop_list(), "ignore_eos": req.ignore_eos, "logprobs": logprobs,
                  "prompt_logprobs": prompt_logprobs}
        try:
            choice_params = [SamplingParams(**params, seed=None if req.seed is None else req.seed + j)
                             for j in range(req.n)]
        except RequestError as exc:
            raise oa.bad_request(str(exc), str(exc).split(":")[0]) from None
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        rid = request.state.request_id
        # choice i answers prompt i // n; with a seed, choice j of a prompt samples with seed + j (reproducible,
        # and the n samples differ)
        opening = [self.open_choice(i, prompts[i // req.n][1], choice_params[i % req.n], deadline, rid)
                   for i in range(len(prompts) * req.n)]
        results = await asyncio.gather(*opening, return_exceptions=True)
        choices = [r for r in results if isinstance(r, Choice)]
        errors = [r for r in results if not isinstance(r, Choice)]
        if errors:
            for c in choices:
                await c.rest.aclose()
            raise errors[0]
        echo = getattr(req, "echo", False)
        for c in choices:
            c.echo = prompts[c.index // req.n][0] if echo else ""
        self.metrics.ttft.observe(time.perf_counter() - request.state.start, tags={"route": kind})
        relay = Relay(kind, self.cfg.model_name, choices, sum(len(ids) for _, ids in prompts),
                      logprobs is not None, self.token_info, req.include_usage())
        return relay, req.stream

    def _done(self, kind: str, relay: Relay, request: Request) -> None:
        m = self.metrics
        m.latency.observe(time.perf_counter() - request.state.start, tags={"route": kind})
        usage = relay.usage()
        for name in ("prompt", "completion"):
            if usage[f"{name}_tokens"] > 0:  # Ray's Counter refuses 0 (a reply may end at once with EOS)
                m.tokens.inc(usage[f"{name}_tokens"], tags={"kind": name})


DOCS_ROUTES = ("/docs", "/openapi.json", "/docs/oauth2-redirect")
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; img-src data: blob:; font-src data:",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


class _Around:
    """Every request: an id (``x-request-id``), the key in front of FastAPI's docs, a metric per /v1 request by
    route template. Plain ASGI: Starlette's BaseHTTPMiddleware would copy each streamed chunk through a memory
    stream of its own."""

    def __init__(self, app, ing: OpenAIIngress):
        self.app, self.ing = app, ing

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req_{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        if self.ing.api_key is not None and scope["path"] in DOCS_ROUTES:
            try:
                self.ing.check_auth(Request(scope))
            except oa.APIError as exc:
                return await JSONResponse(exc.body(), exc.status, headers={"x-request-id": rid})(scope, receive, send)
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"].startswith("/v1/"):
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.ing.metrics.requests.inc(tags={"route": route, "status": str(status)})


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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        return JSONResponse(internal_error(exc, rid).body(), status_code=500, headers={"x-request-id": rid})

    app.add_middleware(_Around, ing=ing)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": ing.cfg.model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        ing.check_auth(request)
        listing = oa.models_list(ing.cfg.model_name, ing.created)
        listing["data"][0].update(ing.info.extras(full=False))
        return listing

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        ing.check_auth(request)
        if model_id != ing.cfg.model_name:
            raise oa.APIError(404, f"the model {model_id!r} does not exist", "invalid_request_error", "model",
                              "model_not_found")
        return {**oa.model_card(ing.cfg.model_name, ing.created), **ing.info.extras(full=True)}

    add_tokenizer_routes(app, ing)

    @app.get("/report")
    async def report(request: Request):
        if not ing.cfg.report or not Path(ing.cfg.report).is_file():
            raise oa.APIError(404, "this server has no run report (raylm report RUN_DIR writes one)",
                              "invalid_request_error", None, "not_found")
        try:
            ing.check_report_auth(request)
        except oa.APIError as exc:
            return JSONResponse(exc.body(), exc.status, headers={"WWW-Authenticate": 'Basic realm="raylm report"'})
        # The page holds text from the corpus and from the models: the CSP sandbox runs it in an opaque origin
        # (its scripts, plotly's, can draw but cannot read this origin's cookies or call the API), and
        # nothing outside the file itself may load.
        return FileResponse(ing.cfg.report, media_type="text/html", headers=REPORT_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await ing.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ing.complete(request, "completion")

    return app
