"""Serving benchmark: output tokens/s and time to first token (p50/p95) of the deployed app at concurrency 1
and 16, against the baseline measured in the same run: sequential ``model.generate`` (transformers, KV cache,
greedy) on the same model with the same number of threads.

    .venv/bin/python benchmarks/serve.py                      # a random Llama like the tiny-cpu recipe's
    .venv/bin/python benchmarks/serve.py --model runs/tiny-cpu/ppo/model --threads 2

Every request generates exactly --max-tokens tokens (``ignore_eos`` on the API, ``min_new_tokens`` in the
baseline), so both sides do the same work. Prints one table and a JSON line with the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny model fixture

PROMPTS = ["Explain what a context manager is.", "Write a short poem about rivers.", "What is a tokenizer?",
           "List three uses of a hash map.", "Describe the os module.", "Why do models need a KV cache?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def baseline(model_dir: Path, n: int, max_tokens: int, threads: int) -> dict:
    """Sequential transformers generate: one request at a time, TTFT from a streamer's first token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first_at = 0, None

        def put(self, value):  # first call: the prompt; second: the first generated token
            self.calls += 1
            if self.calls == 2 and self.first_at is None:
                self.first_at = time.perf_counter()

        def end(self):
            pass

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ttfts, tokens = [], 0
    start = 0.0
    for i in range(-1, n):  # request -1 warms up (first-call allocations), not timed
        if i == 0:
            ttfts, tokens, start = [], 0, time.perf_counter()
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 streamer=streamer)
        ttfts.append(streamer.first_at - t0)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "ttft": ttfts, "tokens": tokens}


async def _serve_load(api: str, n: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=api, api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model="raylm", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    start = time.perf_counter()
    async with client:
        await asyncio.gather(*(one(i) for i in range(n)))
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "ttft": ttfts, "tokens": tokens}


def serve_load(api: str, n: int, concurrency: int, max_tokens: int) -> dict:
    return asyncio.run(_serve_load(api, n, concurrency, max_tokens))


def deploy(model_dir: Path, threads: int, max_tokens: int, stream_interval: int, run_dir: Path) -> dict:
    import socket

    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir
    from cluster.stage import StageContext
    from serve.stage import deploy as deploy_stage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"serve.model={model_dir}", f"serve.port={port}", "serve.demo=false", f"serve.num_cpus={threads}",
                 f"serve.stream_interval={stream_interval}",
                 "serve.max_batch_size=16", "serve.max_ongoing_requests=32", f"serve.max_new_tokens={max_tokens}",
                 "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                 f"ray.num_cpus={threads + 2}"]
    recipe = load_recipe(None, overrides)
    return deploy_stage(StageContext(recipe=recipe, run_dir=RunDir.create(run_dir)))


def summarize(name: str, r: dict, base: dict) -> dict:
    row = {"name": name, "tokens_per_s": round(r["tokens_per_s"], 1),
           "ttft_p50_ms": round(1000 * statistics.median(r["ttft"]), 1),
           "ttft_p95_ms": round(1000 * percentile(r["ttft"], 0.95), 1),
           "tokens_per_s_vs_baseline": round(r["tokens_per_s"] / base["tokens_per_s"], 2)}
    print(f"{name:<28} {row['tokens_per_s']:>10} tok/s  x{row['tokens_per_s_vs_baseline']:<6} "
          f"TTFT p50 {row['ttft_p50_ms']:>8} ms  p95 {row['ttft_p95_ms']:>8} ms", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model dir (default: a random Llama of the tiny-cpu shape)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-c1", type=int, default=8)
    ap.add_argument("--requests-c16", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads: baseline process and engine replica")
    ap.add_argument("--stream-interval", type=int, default=4, help="serve.stream_interval")
    args = ap.parse_args()

    from ray import serve
    from tiny_chat_model import build_tiny_chat_model

    tmp = Path(tempfile.mkdtemp(prefix="raylm-bench-serve-"))
    model_dir = args.model or build_tiny_chat_model(tmp / "model", vocab_size=4096, dim=128, layers=4)
    print(f"model {model_dir}, {args.max_tokens} tokens per request, {args.threads} thread(s) each side",
          flush=True)
    before = baseline(model_dir, args.requests_c1, args.max_tokens, args.threads)
    info = deploy(model_dir, args.threads, args.max_tokens, args.stream_interval, tmp / "run")
    try:
        serve_load(info["api"], 4, 4, 8)  # warm-up: first requests pay for lazy imports and allocations
        c1 = serve_load(info["api"], args.requests_c1, 1, args.max_tokens)
        c16 = serve_load(info["api"], args.requests_c16, 16, args.max_tokens)
    finally:
        serve.shutdown()
        import ray
        ray.shutdown()
    # The baseline runs before and after the serving runs and counts as their mean, so a machine shared with
    # other work skews the ratios less.
    after = baseline(model_dir, args.requests_c1, args.max_tokens, args.threads)
    base = {"tokens_per_s": (before["tokens_per_s"] + after["tokens_per_s"]) / 2, "ttft": before["ttft"] + after["ttft"]}
    print(f"baseline tokens/s before {before['tokens_per_s']:.1f}, after {after['tokens_per_s']:.1f}")
    rows = [summarize("baseline: sequential generate", base, base), summarize("serve, concurrency 1", c1, base),
            summarize("serve, concurrency 16", c16, base)]
    print(json.dumps({"benchmark": "serve", "max_tokens": args.max_tokens, "threads": args.threads,
                      "stream_interval": args.stream_interval, "rows": rows}))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
