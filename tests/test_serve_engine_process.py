"""The hf engine in its own process (serve/local_engine.py), without Ray: it streams what the in-process loop
produces, frees a row when its stream is closed, fails in-flight requests (not hangs) when the engine process
dies, says why a model cannot load, and never outlives the replica that started it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from serve_fixtures import tiny_chat_model  # noqa: F401 - fixture

from serve.batching import generate
from serve.engine import Engine
from serve.local_engine import EngineDied, HFEngine
from serve.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each engine process imports torch and loads the model: seconds, not milliseconds


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_chat_model) -> HFEngine:  # noqa: F811
    return HFEngine(str(tiny_chat_model), max_batch_size=8, batch_wait_timeout_s=0.005, stream_interval=2)


async def collect(hf: HFEngine, prompt: list[int], params: SamplingParams) -> list:
    return [d async for d in hf.generate(prompt, params)]


def test_streams_what_the_in_process_loop_produces(hf, tiny_chat_model):  # noqa: F811
    engine = Engine(tiny_chat_model)
    prompts = [engine.text_prompt_ids(t) for t in ("The os module", "Return the", "hello")]
    solo = ["".join(step[0].text for step in generate(engine, [p], [greedy(12)]) if step[0]) for p in prompts]

    async def main():
        return await asyncio.gather(*(collect(hf, p, greedy(12)) for p in prompts))

    for deltas, expected in zip(asyncio.run(main()), solo, strict=True):
        assert "".join(d.text for d in deltas) == expected
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 12
    hf.check_health()


def test_a_closed_stream_frees_its_row_and_a_bad_request_fails_alone(hf, tiny_chat_model):  # noqa: F811
    async def main():
        gen = hf.generate([5, 6, 7], greedy(10_000))
        first = await gen.__anext__()
        await gen.aclose()  # the client went away: the engine drops the row
        with pytest.raises(ValueError, match="empty"):
            await collect(hf, [], greedy(4))
        return first, await collect(hf, [5, 6, 7], greedy(3))

    first, after = asyncio.run(main())
    assert first.finish_reason is None  # what arrived before the first read (merged): the row was still running
    assert after[-1].completion_tokens == 3
    assert not hf.boxes  # no mailbox left behind


def test_a_dead_engine_process_fails_requests_and_health(tiny_chat_model):  # noqa: F811
    hf = HFEngine(str(tiny_chat_model), max_batch_size=4, batch_wait_timeout_s=0.005, stream_interval=1)

    async def main():
        gen = hf.generate([5, 6, 7], greedy(100_000))
        await gen.__anext__()
        os.kill(hf.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDied):
            async for _ in gen:
                pass
        with pytest.raises(EngineDied):
            await collect(hf, [5, 6, 7], greedy(2))

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="engine process died"):
        hf.check_health()


def test_a_model_that_cannot_load_names_its_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        HFEngine(str(tmp_path), max_batch_size=1, batch_wait_timeout_s=0.005, stream_interval=1)


def test_the_engine_process_exits_with_its_replica(tiny_chat_model, tmp_path):  # noqa: F811
    """SIGKILL the process that started the engine (as Ray kills a replica): the engine process goes too. The host is
    a script without a main guard, which multiprocessing's spawn would run again in the child."""
    script = tmp_path / "replica.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from serve.local_engine import HFEngine
        hf = HFEngine({str(tiny_chat_model)!r}, max_batch_size=1, batch_wait_timeout_s=0.005, stream_interval=1)
        print(hf.process.pid, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(child):
            time.sleep(0.05)  # poll under a deadline
        assert not alive(child), "the engine process outlived its replica"
    finally:
        parent.kill()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except FileNotFoundError:
        return False
    return state != "Z"
