"""Continuous batching without Ray: requests that join a running batch, leave it early, or are cancelled get
exactly what they would get alone (greedy), and the scheduler thread streams them through callbacks."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_fixtures import tiny_chat_model  # noqa: F401 - fixture

from serve.batching import RunningBatch, Scheduler, generate, pad_left
from serve.engine import Engine
from serve.sampling import Delta, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_chat_model) -> Engine:  # noqa: F811
    return Engine(tiny_chat_model)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def solo(engine: Engine, prompt: list[int], n: int) -> str:
    return "".join(d[0].text for d in generate(engine, [prompt], [greedy(n)]) if d[0])


def test_pad_left():
    t = torch.ones(2, 3)
    assert pad_left(t, 5, 1).tolist() == [[0, 0, 1, 1, 1]] * 2
    assert pad_left(t, 2, 1) is t


def test_requests_joining_and_leaving_match_solo_runs(engine):
    a = engine.text_prompt_ids("The os module provides a portable way")
    b = engine.text_prompt_ids("Return")
    c = engine.chat_prompt_ids([{"role": "user", "content": "hello"}])
    batch = RunningBatch(engine)
    texts = {"a": "", "b": "", "c": ""}
    batch.add(["a", "c"], [a, c], [greedy(24), greedy(6)])  # c leaves early: its padding columns get trimmed
    for step in range(24):
        if step == 9:
            batch.add(["b"], [b], [greedy(10)])  # b joins mid-flight, shorter prompt than a's history
        for key, delta in batch.sample():
            texts[key] += delta.text
        batch.forward()
        if not len(batch):
            break
    assert len(batch) == 0
    assert texts == {"a": solo(engine, a, 24), "b": solo(engine, b, 10), "c": solo(engine, c, 6)}


def collect(sched: Scheduler, key, prompt, params, sink: dict, done: threading.Event):
    def emit(item):
        sink.setdefault(key, []).append(item)
        if isinstance(item, BaseException) or item.finish_reason:
            done.set()
    sched.submit(key, prompt, params, emit)


def wait(event: threading.Event, what: str):
    assert event.wait(timeout=60), f"timed out waiting for {what}"


def test_scheduler_streams_staggered_requests(engine):
    sched = Scheduler(engine, max_batch_size=2, stream_interval=3)
    prompts = [engine.text_prompt_ids(t) for t in ("The os module", "Return the", "hello", "path")]
    sink: dict = {}
    events = [threading.Event() for _ in prompts]
    for i, p in enumerate(prompts):  # 4 requests into a batch of 2: later ones wait for room
        collect(sched, i, p, greedy(8), sink, events[i])
        time.sleep(0.01 * i)  # staggered arrivals (not a wait for a result)
    for i, e in enumerate(events):
        wait(e, f"request {i}")
    for i, p in enumerate(prompts):
        deltas: list[Delta] = sink[i]
        assert "".join(d.text for d in deltas) == solo(engine, p, 8)
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 8
        assert len(deltas) == 1 + (8 - 1 + 2) // 3  # first token at once, then one message per 3 tokens


def test_scheduler_cancel_and_bad_prompt(engine):
    sched = Scheduler(engine, max_batch_size=4, stream_interval=1)
    sink: dict = {}
    bad = threading.Event()
    collect(sched, "long", engine.text_prompt_ids("x"), greedy(400), sink, threading.Event())
    collect(sched, "bad", [], greedy(4), sink, bad)
    wait(bad, "the bad request's error")
    assert isinstance(sink["bad"][0], ValueError)
    deadline = time.monotonic() + 60
    while not sink.get("long") and time.monotonic() < deadline:
        time.sleep(0.01)  # poll for the first delta under a deadline
    sched.cancel("long")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the batcher goes idle: blocked on its inbox with an empty batch
        n = len(sink["long"])
        time.sleep(0.2)
        if len(sink["long"]) == n:
            break
    assert len(sink["long"]) < 400 and not sink["long"][-1].finish_reason
    # and it still serves afterwards
    after = threading.Event()
    collect(sched, "after", engine.text_prompt_ids("Return"), greedy(3), sink, after)
    wait(after, "a request after the cancel")
    assert sink["after"][-1].completion_tokens == 3


def test_scheduler_never_starts_a_request_cancelled_while_queued(engine):
    sched = Scheduler(engine, max_batch_size=1, stream_interval=1)
    sink: dict = {}
    collect(sched, "running", engine.text_prompt_ids("x"), greedy(400), sink, threading.Event())
    deadline = time.monotonic() + 60
    while not sink.get("running") and time.monotonic() < deadline:
        time.sleep(0.01)  # poll: the batch's only row is taken
    collect(sched, "queued", engine.text_prompt_ids("y"), greedy(4), sink, threading.Event())
    sched.cancel("queued")
    sched.cancel("running")
    after = threading.Event()
    collect(sched, "after", engine.text_prompt_ids("Return"), greedy(2), sink, after)
    wait(after, "a request behind the cancelled ones")
    assert "queued" not in sink


# ---- isolation: what one request brings fails that request alone ----

def test_failed_add_leaves_the_batch_as_it_was(engine):
    a = engine.text_prompt_ids("The os module provides a portable way")
    batch = RunningBatch(engine)
    batch.add(["a"], [a], [greedy(12)])
    text = "".join(d.text for _, d in batch.sample())
    batch.forward()
    with pytest.raises(ValueError, match="vocabulary"):
        batch.add(["ok", "bad"], [engine.text_prompt_ids("Return"), [engine.vocab_size + 5]], [greedy(4)] * 2)
    assert batch.keys == ["a"] and len(batch.rows) == 1 and batch.mask.shape[0] == 1
    while len(batch):
        text += "".join(d.text for _, d in batch.sample())
        batch.forward()
    assert text == solo(engine, a, 12)


def test_bad_requests_arriving_mid_batch_leave_other_rows_identical(engine):
    """Requests a client can send (or that reach the engine by another handle) arrive while two greedy rows and
    one seeded sampled row run: the running rows' outputs equal their solo runs, each bad one fails alone."""
    sched = Scheduler(engine, max_batch_size=16, stream_interval=1)
    a, b = engine.text_prompt_ids("The os module provides"), engine.text_prompt_ids("Return the")
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    sink: dict = {}
    done = {k: threading.Event() for k in ("a", "b", "s")}
    collect(sched, "a", a, greedy(24), sink, done["a"])
    collect(sched, "b", b, greedy(20), sink, done["b"])
    collect(sched, "s", a, sampled, sink, done["s"])
    deadline = time.monotonic() + 60
    while not all(sink.get(k) for k in ("a", "b", "s")) and time.monotonic() < deadline:
        time.sleep(0.01)  # poll: all three rows are in the running batch
    poisoned = SamplingParams(max_tokens=8, temperature=1.0)
    poisoned.temperature = float("nan")  # past validation: its sampling fails inside the batch step
    bad = {
        "out_of_vocab": ([engine.vocab_size + 5, 1], greedy(4)),
        "negative_id": ([-1], greedy(4)),
        "empty": ([], greedy(4)),
        "too_long": ([1] * engine.max_context, greedy(4)),
        "poisoned": (b, poisoned),
    }
    odd_but_valid = {  # edge values the engine must serve, not fail on
        "huge_seed": (b, SamplingParams(max_tokens=6, temperature=1.0, seed=2**64 + 3)),
        "negative_seed": (b, SamplingParams(max_tokens=6, temperature=1.0, seed=-1)),
        "tiny_temperature": (b, SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True)),
        "tiny_top_p": (b, SamplingParams(max_tokens=6, top_p=1e-300, ignore_eos=True)),
    }
    events = {k: threading.Event() for k in [*bad, *odd_but_valid]}
    for k, (prompt, params) in {**bad, **odd_but_valid}.items():
        collect(sched, k, prompt, params, sink, events[k])
    for k, e in {**done, **events}.items():
        wait(e, k)
    for k in bad:
        assert len(sink[k]) == 1 and isinstance(sink[k][0], ValueError), (k, sink[k])
    for k in odd_but_valid:
        assert isinstance(sink[k][-1], Delta) and sink[k][-1].finish_reason, (k, sink[k])
    assert "".join(d.text for d in sink["tiny_temperature"]) == solo(engine, b, 6)
    assert "".join(d.text for d in sink["a"]) == solo(engine, a, 24)
    assert "".join(d.text for d in sink["b"]) == solo(engine, b, 20)
    alone = "".join(d.text for step in generate(engine, [a], [sampled]) for d in step if d)
    assert "".join(d.text for d in sink["s"]) == alone


# ---- log-probs ----

def test_logprobs_match_the_model(engine):
    prompt = engine.text_prompt_ids("The os module provides")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    deltas = [step[0] for step in generate(engine, [prompt], [params]) if step[0]]
    generated = [e for d in deltas for e in d.logprobs]
    prompt_lp = deltas[0].prompt_logprobs
    assert len(generated) == 5 and len(prompt_lp) == len(prompt)
    ids = prompt + [tok for tok, _, _ in generated]
    with torch.inference_mode():
        ref = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert prompt_lp[0] == (prompt[0], None, [])
    for pos, (tok, lp, alts) in enumerate(prompt_lp[1:] + generated, start=1):
        assert tok == ids[pos] and lp == pytest.approx(float(ref[pos - 1, tok]), abs=1e-4)
    for tok, lp, alts in generated:  # greedy: the chosen token is the best alternative
        assert len(alts) == 3 and alts[0][0] == tok and alts[0][1] == pytest.approx(lp)
    echo_only = SamplingParams(max_tokens=0, prompt_logprobs=0)
    (only,) = [step[0] for step in generate(engine, [prompt], [echo_only])]
    assert (only.text, only.completion_tokens, only.finish_reason) == ("", 0, "length")
    assert [lp for _, lp, _ in only.prompt_logprobs] == pytest.approx([lp for _, lp, _ in prompt_lp])


def test_mailbox_merges_what_a_busy_consumer_has_not_taken():
    import asyncio

    from serve.mailbox import Mailbox

    async def scenario():
        box = Mailbox(asyncio.get_running_loop())
        producer = threading.Thread(target=lambda: [box.put(Delta(t, i + 1)) for i, t in enumerate("abc")])
        producer.start()
        producer.join()  # the consumer was busy for all three
        first = await box.get()
        box.put(Delta("d", 4, "length"))
        last = await box.get()
        box.put(Delta("e", 1))
        box.put(RuntimeError("boom"))
        box.put(Delta("f", 2))
        return first, last, await box.get()

    first, last, failed = asyncio.run(scenario())
    assert (first.text, first.completion_tokens, first.finish_reason) == ("abc", 3, None)
    assert (last.text, last.completion_tokens, last.finish_reason) == ("d", 4, "length")
    assert isinstance(failed, RuntimeError)
