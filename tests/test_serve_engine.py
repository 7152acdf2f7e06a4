"""Unit tests of the serving pieces that need no Ray: the engine's batching loop, the protocol, the demo glue."""
from __future__ import annotations

import json

import pytest
import torch
from serve_fixtures import tiny_chat_model  # noqa: F401 - fixture

from cluster.config import ConfigError
from cluster.recipe import load_recipe
from serve import openai_api as oa
from serve.batching import generate
from serve.engine import Engine, find_stop, held_back, left_pad, top_p_filter
from serve.sampling import SamplingParams
from serve.ui import to_openai_messages


@pytest.fixture(scope="module")
def engine(tiny_chat_model) -> Engine:  # noqa: F811
    return Engine(tiny_chat_model)


def run_all(engine: Engine, prompts, params) -> list[tuple[str, str, int]]:
    """Drive generate to the end: (text, finish_reason, completion_tokens) per request."""
    texts, finishes, counts = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
    for step in generate(engine, prompts, params):
        for i, d in enumerate(step):
            if d is None:
                continue
            assert finishes[i] is None, "a finished request got another delta"
            texts[i] += d.text
            finishes[i], counts[i] = d.finish_reason, d.completion_tokens
    return list(zip(texts, finishes, counts))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


# ---- pure helpers ----

def test_find_stop_returns_earliest_hit():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x"]) is None
    assert find_stop("END abc END", ["END"], start=1) == 8


def test_held_back_withholds_possible_stop_prefix_and_broken_utf8():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("abc\ufffd", []) == 1


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_left_pad_aligns_last_tokens():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---- the batching loop against the model ----

def test_batched_greedy_equals_solo_and_hf_generate(engine):
    prompts = [engine.text_prompt_ids("The os module provides"),
               engine.chat_prompt_ids([{"role": "user", "content": "hi"}]),
               engine.text_prompt_ids("Return the")]
    lengths = [12, 5, 9]  # rows finish at different steps and leave the batch
    batched = run_all(engine, prompts, [greedy(n) for n in lengths])
    for prompt, n, got in zip(prompts, lengths, batched):
        assert run_all(engine, [prompt], [greedy(n)])[0] == got
        ref = engine.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        new = ref[0, len(prompt):].tolist()
        if engine.eos_ids & set(new):
            new = new[:min(new.index(e) for e in engine.eos_ids if e in new)]
        assert got[0] == engine.decode(new).rstrip("\ufffd")


def test_max_tokens_gives_length_and_usage(engine):
    _text, finish, count = run_all(engine, [engine.text_prompt_ids("Return the")], [greedy(7)])[0]
    assert (finish, count) == ("length", 7)
    sampled = [SamplingParams(max_tokens=40, temperature=1.5, seed=s, ignore_eos=True) for s in range(6)]
    outs = run_all(engine, [engine.text_prompt_ids("x")] * 6, sampled)
    assert [(f, c) for _, f, c in outs] == [("length", 40)] * 6


def test_stop_string_cuts_output(engine):
    prompt = engine.text_prompt_ids("The os module provides")
    full, _, _ = run_all(engine, [prompt], [greedy(30)])[0]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop, full
    text, finish, _ = run_all(engine, [prompt], [greedy(30, stop=[stop])])[0]
    assert finish == "stop"
    assert text == full[:full.find(stop)]
    assert stop not in text


def test_seed_makes_sampling_reproducible(engine):
    prompt = engine.text_prompt_ids("Return the")
    p = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9}
    a = run_all(engine, [prompt], [SamplingParams(seed=1, **p)])[0][0]
    # same seed inside a batch with another request: same text
    b = run_all(engine, [engine.text_prompt_ids("x"), prompt], [SamplingParams(seed=5, **p), SamplingParams(seed=1, **p)])
    assert b[1][0] == a
    c = [run_all(engine, [prompt], [SamplingParams(seed=s, **p)])[0][0] for s in (2, 3, 4)]
    assert any(x != a for x in c)


def test_engine_rejects_bad_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine(tmp_path)


# ---- protocol ----

def test_parse_request_errors_name_the_param():
    with pytest.raises(oa.APIError) as err:
        oa.parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}',
                         oa.ChatRequest, 10_000)
    assert err.value.status == 400 and err.value.param == "temperature"
    with pytest.raises(oa.APIError) as err:
        oa.parse_request(b'{"model": "m"}', oa.ChatRequest, 10_000)
    assert err.value.param == "messages"
    with pytest.raises(oa.APIError) as err:
        oa.parse_request(b"{not json", oa.ChatRequest, 10_000)
    assert err.value.status == 400 and "JSON" in err.value.message
    with pytest.raises(oa.APIError) as err:
        oa.parse_request(b" " * 101, oa.ChatRequest, 100)
    assert err.value.status == 413
    body = err.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}


def test_token_limits():
    assert oa.check_token_limits(10, None, 100, 50) == 50
    with pytest.raises(oa.APIError, match="at most 100") as err:
        oa.check_token_limits(101, None, 100, 50)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(oa.APIError) as err:
        oa.check_token_limits(10, 51, 100, 50)
    assert err.value.param == "max_tokens"


def test_sse_and_stop_list():
    assert oa.sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(oa.sse({"a": 1})[6:]) == {"a": 1}
    req = oa.CompletionRequest(model="m", prompt="x", stop="\n")
    assert req.stop_list() == ["\n"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v1-style fields inside Ray Serve
def test_engine_errors_map_to_statuses():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from serve.ingress import engine_error
    assert engine_error(BackPressureError(num_queued_requests=9, max_queued_requests=8), 5).status == 429
    assert engine_error(TimeoutError(), 5).status == 503
    assert engine_error(ActorDiedError(), 5).status == 503
    assert engine_error(RuntimeError("x"), 5).status == 500


def test_demo_history_to_openai_messages():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert to_openai_messages("next", history, "be brief") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "next"}]
    assert to_openai_messages("x", [], " ")[0] == {"role": "user", "content": "x"}


@pytest.mark.parametrize("override, key", [
    ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("serve.max_ongoing_requests=4", "serve.max_ongoing_requests"),
    ("serve.autoscaling.target_ongoing_requests=0", "serve.autoscaling.target_ongoing_requests"),
    ("serve.max_queued_requests=0", "serve.max_queued_requests"),
    ("serve.engine=tgi", "serve.engine"),
])
def test_serve_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"{key}:"):
        load_recipe(None, [override])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_build_app_args(tiny_chat_model):  # noqa: F811
    from ray.serve import Application

    from serve.app import build_app
    app = build_app({"model": str(tiny_chat_model), "overrides": "serve.demo=false serve.max_batch_size=4"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown args"):
        build_app({"model": str(tiny_chat_model), "bogus": 1})
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_app({"model": "/nonexistent"})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        build_app({"model": str(tiny_chat_model), "overrides": ["serve.max_batch_size=0"]})


# ---- hostile and odd request bodies: each a 400 naming what is wrong ----

CHAT_BODY = '"model": "m", "messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize("body, param", [
    (b'{"model": "m", "seed": ' + b"9" * 5000 + b"}", None),  # an integer too long to parse
    (b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # nested past any sane depth
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', None),  # a lone surrogate
    (b"\xff\xfe{}", None),  # not UTF-8
    (b"[1, 2]", None),
    (b'"just a string"', None),
    (("{" + CHAT_BODY + ', "temperature": NaN}').encode(), "temperature"),
    (("{" + CHAT_BODY + ', "temperature": Infinity}').encode(), "temperature"),
    (("{" + CHAT_BODY + ', "temperature": 1e-400}').encode(), None),  # parses as 0.0: valid (greedy)
    (("{" + CHAT_BODY + f', "seed": {2**64}}}').encode(), "seed"),
    (("{" + CHAT_BODY + f', "seed": {-2**63 - 1}}}').encode(), "seed"),
    (("{" + CHAT_BODY + ', "seed": 1.5}').encode(), "seed"),
    (("{" + CHAT_BODY + ', "top_p": 0}').encode(), "top_p"),
    (("{" + CHAT_BODY + ', "n": 0}').encode(), "n"),
    (("{" + CHAT_BODY + ', "max_tokens": -1}').encode(), "max_tokens"),
    (("{" + CHAT_BODY + ', "stream": "yes"}').encode(), "stream"),
    (("{" + CHAT_BODY + ', "tools": [{"type": "function"}]}').encode(), "tools"),
    (("{" + CHAT_BODY + ', "response_format": {"type": "json_object"}}').encode(), "response_format"),
    (("{" + CHAT_BODY + ', "logit_bias": {"5": 10}}').encode(), "logit_bias"),
    (("{" + CHAT_BODY + ', "presence_penalty": 0.5}').encode(), "presence_penalty"),
    (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user"}]}', "messages"),
    (b'{"model": 5, "messages": []}', "model"),
])
def test_hostile_chat_bodies_are_400_naming_the_field(body, param):
    if b"1e-400" in body:
        assert oa.parse_request(body, oa.ChatRequest, 10**7).temperature == 0
        return
    with pytest.raises(oa.APIError) as err:
        req = oa.parse_request(body, oa.ChatRequest, 10**7)
        req.messages_for_template()  # content parts are checked when rendered
    assert err.value.status == 400, err.value.message
    assert err.value.param == param, err.value.message
    assert "Traceback" not in err.value.message and len(err.value.message) < 600


def test_request_fields_null_means_default_and_checks_that_need_two_fields():
    req = oa.parse_request(("{" + CHAT_BODY + ', "temperature": null, "n": null, "seed": null}').encode(),
                           oa.ChatRequest, 10_000)
    assert (req.temperature, req.n, req.seed) == (1.0, 1, None)
    req = oa.parse_request(("{" + CHAT_BODY + ', "top_logprobs": 3}').encode(), oa.ChatRequest, 10_000)
    with pytest.raises(oa.APIError, match="logprobs") as err:
        req.logprob_counts()
    assert err.value.param == "top_logprobs"
    for prompt in ('""', "[]", '[""]', "[[]]"):
        req = oa.parse_request(f'{{"model": "m", "prompt": {prompt}}}'.encode(), oa.CompletionRequest, 10_000)
        with pytest.raises(oa.APIError) as err:
            req.prompts()
        assert err.value.param == "prompt"
    req = oa.parse_request(b'{"model": "m", "prompt": "x", "max_tokens": 0}', oa.CompletionRequest, 10_000)
    with pytest.raises(oa.APIError, match="echo"):
        req.token_budget()
    req = oa.parse_request(b'{"model": "m", "prompt": [[1, 2], [3]], "echo": true, "max_tokens": 0, "logprobs": 2}',
                           oa.CompletionRequest, 10_000)
    assert req.prompts() == [[1, 2], [3]] and req.token_budget() == 0 and req.logprob_counts() == (2, 2)


@pytest.mark.parametrize("params", [
    {"max_tokens": -1}, {"max_tokens": 4, "temperature": float("nan")}, {"max_tokens": 4, "temperature": -1},
    {"max_tokens": 4, "top_p": 0}, {"max_tokens": 4, "seed": "7"}, {"max_tokens": 4, "logprobs": 21},
    {"max_tokens": 4, "stop": [3]},
])
def test_sampling_params_refuse_what_the_engine_cannot_use(params):
    from serve.sampling import RequestError
    with pytest.raises(RequestError):
        SamplingParams(**params)
