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
from polling import wait_for
from serve_fixtures import deployed, tiny_chat_model  # noqa: F401 - fixture

pytestmark = [pytest.mark.ray, pytest.mark.serve,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pydantic v1-style fields in Ray Serve

API_KEY = "test-key-0123456789"
MODEL = "raylm"
CHAT = [{"role": "user", "content": "Say something."}]


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
    from ray import serve

    from serve.app import APP_NAME, ENGINE
    return dict(serve.status().applications[APP_NAME].deployments[ENGINE].replica_states)




async def _load(base: str, n: int, concurrency: int, max_tokens: int, done: list | None,
                stop: threading.Event | None) -> list[int]:
    """n completion requests, at most `concurrency` in flight (fewer if `stop` is set); returns the statuses."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(i: int) -> int | None:
            async with sem:
                if stop is not None and stop.is_set():
                    return None
                r = await http.post("/completions", json={"model": MODEL, "prompt": f"request {i}",
                                                          "max_tokens": max_tokens, "temperature": 0.7})
                if r.status_code == 200:
                    assert 0 <= r.json()["usage"]["completion_tokens"] <= max_tokens  # 0: EOS came first
                if done is not None:
                    done.append(r.status_code)
                return r.status_code
        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        return [s for s in statuses if s is not None]


def load(base: str, n: int, concurrency: int, max_tokens: int = 8, done: list | None = None,
         stop: threading.Event | None = None) -> list[int]:
    return asyncio.run(_load(base, n, concurrency, max_tokens, done, stop))


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
    body = {"model": MODEL, "prompt": "The os module", "max_tokens": 10, "stream": True}
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
    ({"n": 2}, "n"),
])
def test_bad_requests_are_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, **extra})
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.body["type"] == "invalid_request_error"


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
        """PIDs of the live LLMEngine replica actors (Serve names them SERVE_REPLICA::raylm#LLMEngine#<id>)."""
        pids = set()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("SERVE_REPLICA::raylm#LLMEngine#"):
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                try:
                    pids.add(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
                except ray.exceptions.RayError:
                    pass  # dead or restarting: not a live replica
        return pids

    concurrency, total = 8, 240
    done: list[int] = []
    runner = threading.Thread(target=load, args=(app["api"], total, concurrency, 16, done), daemon=True)
    runner.start()
    wait_for(lambda: len(done) >= 20, 120, "the load to get going")
    victim = min(replica_pids())
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and len(done) == total
    failed = [s for s in done if s != 200]
    # only requests the killed replica was generating may fail (at most `concurrency`), with 503; those it had
    # not started are sent to another replica by the ingress
    assert len(failed) <= concurrency, failed
    assert set(failed) <= {503}, failed
    wait_for(lambda: replica_pids() and victim not in replica_pids()
             and engine_replicas().get("RUNNING", 0) >= 1, 120, "Serve to replace the killed replica")
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=4).usage.completion_tokens >= 1


@pytest.mark.slow
def test_overload_gets_429_and_no_server_error(app):
    # 80 at once against serve.max_pending_requests=40: the overflow is told to retry, the rest are served
    statuses = load(app["api"], 80, 80, max_tokens=32)
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert set(statuses) <= {200, 429}, {s: statuses.count(s) for s in set(statuses)}


def test_prometheus_metrics_are_exported(app, client):
    """Our ray.serve.metrics reach the node's Prometheus endpoint (exported every few seconds)."""
    import ray

    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("raylm_requests", "raylm_request_latency_s", "raylm_time_to_first_token_s", "raylm_tokens")

    def exported() -> bool:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            return False
        return all(name in text for name in wanted) and 'route="/v1/completions"' in text

    wait_for(exported, 90, f"{wanted} on the metrics endpoint (port {port})")
