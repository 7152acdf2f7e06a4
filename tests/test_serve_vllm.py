"""``serve.engine: vllm`` behind raylm's own ingress.

The first test runs everywhere (no Ray): without vllm the app fails before Serve starts, naming the fix. The
deployed one is opt-in, as vLLM lives in its own venv and takes minutes to start on CPU: create the venv with
``python -m serve.vllm_engine --setup`` and point ``RAYLM_VLLM_PYTHON`` at its python (e.g.
``RAYLM_VLLM_PYTHON=~/.cache/raylm/vllm-venv/bin/python``)."""
from __future__ import annotations

import importlib.util
import os
import sys

import httpx
import openai
import pytest
from polling import wait_for
from serve_fixtures import deployed

VLLM_PYTHON = os.environ.get("RAYLM_VLLM_PYTHON", "")
API_KEY = "vllm-test-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.mark.parametrize("python, message", [
    ("/nonexistent/bin/python", "serve.engine_python: /nonexistent/bin/python does not exist"),
    (sys.executable, "serve.engine: vllm needs the vllm package in the engine's Python"),
])
def test_vllm_engine_without_vllm_fails_before_serve_starts(tmp_path, python, message):
    from cluster.recipe import load_recipe
    from serve.app import build_from_config

    if python == sys.executable and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this Python")
    (tmp_path / "config.json").write_text("{}")
    cfg = load_recipe(None, ["serve.engine=vllm", f"serve.engine_python={python}"]).serve
    with pytest.raises(RuntimeError, match=message):
        build_from_config(cfg, tmp_path)


@pytest.fixture(scope="module")
def vllm_app(ray_cluster, tmp_path_factory):
    from tiny_chat_model import build_tiny_chat_model

    tmp = tmp_path_factory.mktemp("serve-vllm")
    # head_dim 64 (dim 256, 4 heads): vLLM's CPU attention has no kernels for the 16 of the usual tiny model
    model = build_tiny_chat_model(tmp / "model", dim=256)
    key_file = tmp / "api-key"  # a file: the replicas' environment was fixed when the session cluster started
    key_file.write_text(API_KEY)
    overrides = [
        "serve.engine=vllm", f"serve.engine_python={VLLM_PYTHON}", f"serve.api_key_file={key_file}",
        "serve.demo=false", "serve.max_prompt_tokens=64", "serve.max_new_tokens=16",
        "serve.autoscaling.max_replicas=1", "serve.engine_args.dtype=float32",
        "serve.engine_env.VLLM_CPU_KVCACHE_SPACE='1'", "serve.engine_env.VLLM_CPU_OMP_THREADS_BIND=nobind",
    ]
    with deployed(tmp / "run", model, overrides) as (info, _ctx):
        yield info


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: set RAYLM_VLLM_PYTHON to a Python with vllm "
                                            "(python -m serve.vllm_engine --setup makes one)")
def test_vllm_engine_behind_the_raylm_ingress(vllm_app):
    base = vllm_app["api"]
    http = httpx.Client(timeout=120)  # a busy machine: the first requests through a fresh proxy can take seconds
    # the key is raylm's: checked by the ingress before anything reaches vLLM
    assert http.post(f"{base}/chat/completions", json={"model": "raylm", "messages": CHAT}).status_code == 401

    client = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(model="raylm", messages=CHAT, max_tokens=8,
                                                          temperature=0, logprobs=True, top_logprobs=2)
    assert raw.headers["x-request-id"].startswith("req_")  # raylm's middleware answered
    reply = raw.parse()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    assert all(len(e.top_logprobs) == 2 for e in entries)

    chunks = list(client.chat.completions.create(model="raylm", messages=CHAT, max_tokens=12, stream=True,
                                                 seed=3, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0 and isinstance(text, str)
    same = client.chat.completions.create(model="raylm", messages=CHAT, max_tokens=12, seed=3)
    assert same.choices[0].message.content == text  # a seed reproduces across streamed and whole replies

    # echo with max_tokens 0: the prompt's log-probs only, no generation
    echo = client.completions.create(model="raylm", prompt="hello there", max_tokens=0, echo=True, logprobs=1)
    assert echo.choices[0].text == "hello there" and echo.usage.completion_tokens == 0
    assert echo.choices[0].logprobs.token_logprobs[0] is None

    # hostile input: the ingress's 400s, whatever the engine
    r = http.post(f"{base}/chat/completions", headers=AUTH,
                   json={"model": "raylm", "messages": CHAT, "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post(f"{base}/completions", headers=AUTH, json={"model": "raylm", "prompt": "x " * 500})
    assert r.status_code == 400

    # raylm's metrics, counted by the ingress for vLLM's tokens too
    import ray
    port = ray._private.worker.global_worker.node.metrics_export_port

    def exported() -> bool:
        try:
            text = http.get(f"http://127.0.0.1:{port}/metrics").text
        except httpx.HTTPError:
            return False
        return "raylm_tokens" in text and 'kind="completion"' in text and "raylm_time_to_first_token_s" in text

    wait_for(exported, 90, "raylm metrics on the metrics endpoint")
