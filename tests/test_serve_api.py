"""The deployed application over real HTTP: the official openai client, error statuses, autoscaling, load and a
replica killed under load. One deployment for the module (serve.run costs ~15-40 s here)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import httpx
import openai
import pytest
from openai_schema import validate
from polling import wait_for
from serve_fixtures import deployed, tiny_chat_model  # noqa: F401 - fixture

pytestmark = [pytest.mark.ray, pytest.mark.serve,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pydantic v1-style fields in Ray Serve

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "raylm"
CHAT = [{"role": "user", "content": "Say something."}]
DROPPED = 0  # the status recorded for a request whose connection dropped before any response


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_chat_model, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve-api")
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    overrides = [
        f"serve.api_key_file={key_file}", "serve.demo=false",
        "serve.max_batch_size=8", "serve.max_ongoing_requests=16", "serve.max_pending_requests=40",
        "serve.max_prompt_tokens=64",
        "serve.max_new_tokens=32", "serve.max_body_bytes=20000", "serve.request_timeout_s=30",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=2", "serve.autoscaling.upscale_delay_s=1",
        "serve.autoscaling.downscale_delay_s=3",
    ]
    with deployed(tmp / "run", tiny_chat_model, overrides) as (info, _ctx):
        yield info


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app["api"], api_key=API_KEY, max_retries=0, timeout=60)


def engine_replicas() -> dict[str, int]:
    """Replica states of the deployment holding the model (with the hf engine: the ingress itself)."""
    from ray import serve

    from serve.app import APP_NAME, INGRESS
    return dict(serve.status().applications[APP_NAME].deployments[INGRESS].replica_states)




async def _load(base: str, n: int, concurrency: int, max_tokens: int, done: list | None,
                stop: threading.Event | None, resend_dropped: bool = False) -> list[int]:
    """n completion requests, at most `concurrency` in flight (fewer if `stop` is set); returns the statuses.
    `resend_dropped`: a request whose connection closed without any response is sent once more, half a second
    later, as the openai SDK (its first retry) and browsers do: HAProxy closes a keep-alive client connection
    silently when the replica behind it fails, so that the client resends (docs/serving.md)."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(i: int) -> int | None:
            async with sem:
                if stop is not None and stop.is_set():
                    return None
                body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0.7}
                try:
                    try:
                        r = await http.post("/completions", json=body)
                    except (httpx.NetworkError, httpx.RemoteProtocolError):  # closed, not timed out
                        if not resend_dropped:
                            raise
                        await asyncio.sleep(0.5)  # the client's back-off before its resend, not a wait in the test
                        r = await http.post("/completions", json=body)
                except httpx.TransportError:  # the connection dropped (its replica died): no status at all
                    if done is not None:
                        done.append(DROPPED)
                    return DROPPED
                if r.status_code == 200:
                    assert 0 <= r.json()["usage"]["completion_tokens"] <= max_tokens  # 0: EOS came first
                if done is not None:
                    done.append(r.status_code)
                return r.status_code
        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        return [s for s in statuses if s is not None]


def load(base: str, n: int, concurrency: int, max_tokens: int = 8, done: list | None = None,
         stop: threading.Event | None = None, resend_dropped: bool = False) -> list[int]:
    return asyncio.run(_load(base, n, concurrency, max_tokens, done, stop, resend_dropped))


# ---- the OpenAI client ----

def test_models_and_health(app, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(app["health"]).json()["status"] == "ok"


def test_chat_completion_with_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_ends_with_done(app):
    body = {"model": MODEL, "prompt": "The os module", "max_tokens": 10, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", app["api"] + "/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(chunks) >= 3  # streamed token by token, not in one piece


def test_completions_seed_stop_and_length(client):
    args = {"model": MODEL, "prompt": "Return the", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    a = client.completions.create(seed=7, **args).choices[0]
    b = client.completions.create(seed=7, **args).choices[0]
    assert a.text == b.text
    full = client.completions.create(**{**args, "temperature": 0}).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(**{**args, "temperature": 0}, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]


# ---- errors ----

def test_missing_or_wrong_key_is_401(app):
    c = openai.OpenAI(base_url=app["api"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        c.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    r = httpx.post(app["api"] + "/chat/completions", json={"model": MODEL, "messages": CHAT})  # no header
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(app["health"]).status_code == 200  # health needs no key (probes)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert err.value.code == "model_not_found" and err.value.param == "model"


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 33}, "max_tokens"),  # over serve.max_new_tokens
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),  # over serve.max_prompt_tokens
    ({"messages": []}, "messages"),
    ({"n": 9}, "n"),  # over serve.max_choices
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"seed": 2**64}, "seed"),
])
def test_bad_requests_are_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, **extra})
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.body["type"] == "invalid_request_error"
    validate({"error": err.value.body}, "ErrorResponse")


def test_raw_http_errors_are_openai_shaped(app):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    cases = [("/chat/completions", b"{oops", 400), ("/chat/completions", b" " * 20001, 413),
             ("/nowhere", b"{}", 404)]
    for path, body, status in cases:
        r = httpx.post(app["api"] + path, content=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- scale, load, failure ----

@pytest.mark.slow
def test_autoscaling_up_under_burst_and_down_when_idle(app):
    wait_for(lambda: engine_replicas().get("RUNNING") == 1, 60, "one engine replica before the burst")
    done: list[int] = []
    stop = threading.Event()
    burst = threading.Thread(target=load, args=(app["api"], 2000, 16, 24, done, stop), daemon=True)
    burst.start()
    try:
        wait_for(lambda: engine_replicas().get("RUNNING", 0) >= 2, 90, "a second replica under load")
    finally:
        stop.set()
        burst.join(timeout=120)
    assert done and all(s == 200 for s in done)
    wait_for(lambda: engine_replicas() == {"RUNNING": 1}, 90, "scale-down to one replica when idle")


@pytest.mark.slow
def test_500_requests_at_concurrency_16_without_server_errors(app):
    statuses = load(app["api"], 500, 16, max_tokens=8)
    assert len(statuses) == 500
    assert statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}


@pytest.mark.slow
def test_killing_a_replica_under_load_fails_only_its_requests(app, client):
    import ray

    def replica_pids() -> set[int]:
        """PIDs of the live model replicas (Serve names them SERVE_REPLICA::raylm#OpenAIIngress#<id>)."""
        pids = set()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("SERVE_REPLICA::raylm#OpenAIIngress#"):
                try:  # listed, then gone before the lookup (the victim, a scale-down): ValueError
                    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                    pids.add(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
                except (ValueError, ray.exceptions.RayError):
                    pass  # dead or restarting: not a live replica
        return pids

    concurrency, total = 8, 240
    done: list[int] = []
    runner = threading.Thread(target=load, args=(app["api"], total, concurrency, 16, done, None, True),
                              daemon=True)
    runner.start()
    wait_for(lambda: len(done) >= 20, 120, "the load to get going")
    victim = min(replica_pids())
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and len(done) == total
    failed = [s for s in done if s != 200]
    # only requests the killed replica held may fail (at most `concurrency`): Serve's proxy answers them with a
    # 5xx; HAProxy closes a keep-alive client connection without a response (resent once above, it then lands on
    # a live replica) and answers 502 (sent as 500) to a request on a new one. A request arriving in the few ms
    # while the replica's process is torn down is accepted by its socket and reset: it was held too. Later
    # requests go elsewhere.
    assert len(failed) <= concurrency, failed
    assert set(failed) <= {DROPPED, 500, 502, 503}, failed
    wait_for(lambda: replica_pids() and victim not in replica_pids()
             and engine_replicas().get("RUNNING", 0) >= 1, 120, "Serve to replace the killed replica")
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=4).usage.completion_tokens >= 1


@pytest.mark.slow
def test_overload_gets_429_and_no_server_error(app):
    # 100 at once against serve.max_pending_requests=40 per replica, autoscaling.max_replicas=2: the overflow is
    # told to retry, the rest are served (HAProxy spreads by least connections: 80 fill two replicas exactly)
    statuses = load(app["api"], 100, 100, max_tokens=32)
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert set(statuses) <= {200, 429}, {s: statuses.count(s) for s in set(statuses)}


def test_prometheus_metrics_are_exported(app, client):
    """Our ray.serve.metrics reach the node's Prometheus endpoint (exported every few seconds)."""
    import ray

    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("raylm_requests", "raylm_request_latency_s", "raylm_time_to_first_token_s", "raylm_tokens")
    scans = [f"/v1/scan-{i}-probe" for i in range(3)]  # random paths must not make metric series of their own
    for path in [*scans, "/v1/models/not-a-model"]:
        assert httpx.get(app["api"][:-3] + path, headers=AUTH).status_code == 404

    def exported() -> str | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        ok = all(name in text for name in wanted) and 'route="/v1/completions"' in text \
            and 'route="/v1/models/{model_id}"' in text and 'route="unmatched"' in text
        return text if ok else None

    text = wait_for(exported, 90, f"{wanted} on the metrics endpoint (port {port})")
    assert not any(path in text for path in scans) and "not-a-model" not in text


# ---- hostile input: a 4xx naming the field, nothing internal, nobody else's request touched ----

LEAKS = ("Traceback", "pid=", "ip=", "actor_id", "ActorID", "RayTaskError", "File \"")
CHAT_JSON = '"model": "raylm", "messages": [{"role": "user", "content": "hi"}]'
HOSTILE = [
    ("/completions", b'{"model": "raylm", "prompt": ""}', "prompt"),
    ("/completions", b'{"model": "raylm", "prompt": [[]]}', "prompt"),
    ("/completions", b'{"model": "raylm", "prompt": [99999999, 5]}', "prompt"),
    ("/completions", b'{"model": "raylm", "prompt": [-3]}', "prompt"),
    ("/completions", b'{"model": "raylm", "prompt": "x", "max_tokens": 0}', "max_tokens"),
    ("/completions", b'{"model": "raylm", "prompt": "x", "best_of": 3}', "best_of"),
    ("/completions", b'{"model": "raylm", "prompt": ["a", "b", "c"], "n": 3}', "n"),
    ("/chat/completions", ("{" + CHAT_JSON + f', "seed": {2**64}}}').encode(), "seed"),
    ("/chat/completions", ("{" + CHAT_JSON + ', "seed": ' + "9" * 5000 + "}").encode(), None),
    ("/chat/completions", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),  # under the body limit
    ("/chat/completions", b'{"model": "raylm", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("/chat/completions", ("{" + CHAT_JSON + ', "temperature": NaN}').encode(), "temperature"),
    ("/chat/completions", ("{" + CHAT_JSON + ', "max_tokens": 0}').encode(), "max_tokens"),
    ("/chat/completions", ("{" + CHAT_JSON + ', "top_logprobs": 2}').encode(), "top_logprobs"),
    ("/chat/completions", ("{" + CHAT_JSON + ', "response_format": {"type": "json_schema"}}').encode(),
     "response_format"),
    ("/chat/completions", b'{"model": "raylm", "messages": [{"role": "user", "content": [{"type": "file"}]}]}',
     "messages"),
]


@pytest.mark.parametrize("path, body, param", HOSTILE, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(HOSTILE)])
def test_hostile_requests_get_an_openai_shaped_400(app, path, body, param):
    r = httpx.post(app["api"] + path, content=body, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text[:500]
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param, r.text[:500]
    assert not any(leak in r.text for leak in LEAKS), r.text[:500]
    assert r.headers["x-request-id"].startswith("req_")


def test_odd_but_valid_values_are_served_and_leave_other_requests_identical(app):
    """Values at the edges of what the API accepts (seeds at the int64 ends, temperature and top_p near 0,
    token-id prompts), sent while greedy requests run: those are served, and the greedy outputs are the same
    as when each ran alone."""
    greedy = [{"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
              for p in ("The os module", "Return the path", "hello")]
    odd = [{"model": MODEL, "prompt": "x", "max_tokens": 8, **extra} for extra in (
        {"seed": -2**63}, {"seed": 2**63 - 1}, {"seed": -1}, {"temperature": 1e-300}, {"top_p": 1e-300},
        {"temperature": 2, "top_p": 1e-9, "seed": 3}, {"prompt": [1, 2, 3]}, {"n": 4, "seed": 11})]

    async def run(bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app["api"], headers=AUTH, timeout=60) as http:
            return await asyncio.gather(*(http.post("/completions", json=b) for b in bodies))

    alone = [asyncio.run(run([g]))[0].json()["choices"][0]["text"] for g in greedy]
    mixed = asyncio.run(run([*greedy, *odd, *odd]))
    assert all(r.status_code == 200 for r in mixed), [r.text[:300] for r in mixed if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in mixed[:3]] == alone
    four = mixed[3 + len(odd) - 1].json()["choices"]
    assert [c["index"] for c in four] == [0, 1, 2, 3] and len({c["text"] for c in four}) > 1
    assert four == mixed[-1].json()["choices"]  # seeded: the same request gives the same n choices


def test_docs_and_openapi_need_the_key(app):
    base = app["api"][:-3]
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(base + path).status_code == 401
        assert httpx.get(base + path, headers=AUTH).status_code == 200


# ---- conformance with OpenAI's published schemas ----

def test_chat_with_n_and_logprobs_matches_the_schema(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.9, seed=5, n=2,
                                       logprobs=True, top_logprobs=3)
    body = r.model_dump(exclude_unset=True)
    validate(body, "CreateChatCompletionResponse")
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.refusal is None
        tokens = c.logprobs.content
        joined = b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace").rstrip("\ufffd")
        assert joined == c.message.content or c.finish_reason == "stop"
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_chat_stream_with_usage_matches_the_schema(app):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "n": 2, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", app["api"] + "/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert len(finishes) == 2


def test_completions_echo_logprobs_as_lm_eval_asks(app):
    """lm-evaluation-harness's log-likelihood requests: echo, max_tokens 0 (or 1), logprobs, token-id or text
    prompts, several prompts per request."""
    body = {"model": MODEL, "prompt": ["The os module", "Return the"], "echo": True, "max_tokens": 0,
            "logprobs": 1, "temperature": 0}
    r = httpx.post(app["api"] + "/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateCompletionResponse")
    for choice, prompt in zip(r.json()["choices"], body["prompt"]):
        lp = choice["logprobs"]
        assert choice["text"] == prompt and lp["token_logprobs"][0] is None
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) >= 2
        assert all(x <= 0 for x in lp["token_logprobs"][1:])
    body = {**body, "prompt": [5, 6, 7, 8], "max_tokens": 1}
    choice = httpx.post(app["api"] + "/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 5  # the 4 prompt tokens, then the generated one


def test_completions_stream_and_models_match_the_schema(app, client):
    body = {"model": MODEL, "prompt": "The os module", "max_tokens": 6, "stream": True, "logprobs": 2,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", app["api"] + "/completions", json=body, headers=AUTH, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for chunk in events:
        validate(chunk, "CreateCompletionResponse")
    assert events[-1]["usage"]["completion_tokens"] > 0
    validate(httpx.get(app["api"] + "/models", headers=AUTH).json(), "ListModelsResponse")
    validate(httpx.get(app["api"] + f"/models/{MODEL}", headers=AUTH).json(), "Model")
