"""The hf engine as a replica runs it: the model, the continuous-batching thread (serve/batching.py), and an async
``generate`` that streams one request's Deltas to the replica's event loop.

With ``serve.engine: hf`` it runs inside each ``OpenAIIngress`` replica (no Serve handle between HTTP and the
model); ``serve.engine: vllm`` keeps a separate engine deployment with the same ``generate`` contract
(serve/vllm_engine.py), because vLLM runs in its own Python.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve.sampling import Delta, SamplingParams


class HFEngine:
    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, stream_interval: int):
        from serve.batching import Scheduler
        from serve.engine import Engine

        self.engine = Engine(model_dir)
        self.scheduler = Scheduler(self.engine, max_batch_size, stream_interval, gather_s=batch_wait_timeout_s)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields the request's Deltas (text, completion_tokens, finish_reason, log-probs) as its tokens come;
        closing the generator early (client gone, timeout) frees the request's batch row."""
        from serve.mailbox import Mailbox

        mailbox = Mailbox(asyncio.get_running_loop())
        key = object()
        self.scheduler.submit(key, prompt_ids, params, mailbox.put)
        finished = False
        try:
            while not finished:
                item = await mailbox.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.scheduler.cancel(key)

    def check_health(self) -> None:
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the batching thread died")
