"""Continuous batching without Ray: requests that join a running batch, leave it early, or are cancelled get
exactly what they would get alone (greedy), and the scheduler thread streams them through callbacks."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_fixtures import tiny_chat_model  # noqa: F401 - fixture

from serve.batching import RunningBatch, Scheduler, pad_left
from serve.engine import Delta, Engine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_chat_model) -> Engine:  # noqa: F811
    return Engine(tiny_chat_model)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def solo(engine: Engine, prompt: list[int], n: int) -> str:
    return "".join(d[0].text for d in engine.generate_stream([prompt], [greedy(n)]) if d[0])


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
        for key, delta in batch.step():
            texts[key] += delta.text
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
