"""The Ray Serve application: ``serve.app:build_app`` (the import path KubeRay's RayService uses).

One application, APP_NAME, of two deployments whose names are stable (serveConfigV2 and dashboards refer to them):

- ``OpenAIIngress`` (ingress, ``ingress_replicas`` fixed replicas): the HTTP routes (/v1/chat/completions,
  /v1/completions, /v1/models, /health), the API key check, input limits, Prometheus metrics, and the Gradio
  demo mounted at /demo. It tokenizes and validates, then streams from the engine through a handle.
- ``LLMEngine`` (autoscaled from ``serve.autoscaling``): the model, run by a continuous-batching loop
  (requests join and leave the running batch between decode steps); each request's tokens stream back.

``serve.engine: vllm`` runs vLLM's engine in ``LLMEngine`` instead (serve/vllm_engine.py, same ``generate``
contract), in the Python of ``serve.engine_python``; the ingress, and so the whole HTTP surface, stays the same.
"""
from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve
from ray.serve import Application

from cluster.recipe import load_recipe
from cluster.schemas.serve import ServeConfig
from serve.sampling import Delta, SamplingParams

APP_NAME = "raylm"
INGRESS = "OpenAIIngress"
ENGINE = "LLMEngine"


@serve.deployment(name=ENGINE)
class LLMEngine:
    """Holds one copy of the model; a continuous-batching loop (serve/batching.py) runs it in a thread."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, stream_interval: int):
        from serve.batching import Scheduler
        from serve.engine import Engine

        self.engine = Engine(model_dir)
        self.scheduler = Scheduler(self.engine, max_batch_size, stream_interval, gather_s=batch_wait_timeout_s)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields the request's Deltas (text, completion_tokens, finish_reason, log-probs) as its tokens come."""
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
            if not finished:  # the client went away (or an error): free the request's batch slot
                self.scheduler.cancel(key)

    def check_health(self) -> None:
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the batching thread died")


def _ingress_class():
    # Imported here: the ingress pulls in FastAPI/gradio, which the engine replicas need not load.
    from serve.ingress import OpenAIIngress
    return OpenAIIngress


def build_from_config(cfg: ServeConfig, model_dir: str | Path) -> Application:
    """The bound application for a validated ServeConfig and a model dir."""
    model_dir = str(Path(model_dir).resolve())
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"serve: {model_dir} is not a Hugging Face model dir (no config.json)")
    actor_options: dict = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.engine == "vllm":
        from serve.vllm_engine import VLLMEngine, require_vllm

        require_vllm(cfg.engine_python)  # here, before Serve starts, not in a replica that retries
        runtime_env: dict = {"env_vars": dict(cfg.engine_env)}
        if cfg.engine_python:
            runtime_env["py_executable"] = cfg.engine_python
        actor_options["runtime_env"] = runtime_env
        deployment = serve.deployment(VLLMEngine, name=ENGINE)
        engine_args = {"max_num_seqs": cfg.max_batch_size, **cfg.engine_args}
        args: tuple = (model_dir, cfg.max_prompt_tokens + cfg.max_new_tokens, cfg.stream_interval, engine_args)
    else:
        if cfg.engine_env:
            actor_options["runtime_env"] = {"env_vars": dict(cfg.engine_env)}
        deployment = LLMEngine
        args = (model_dir, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.stream_interval)
    engine = deployment.options(
        autoscaling_config=cfg.autoscaling.to_serve(),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=actor_options,
        # one engine call per completion choice, already in the ingress's access log: no second line per call
        logging_config={"enable_access_log": False},
    ).bind(*args)
    ingress = serve.deployment(_ingress_class(), name=INGRESS).options(
        num_replicas=cfg.ingress_replicas,
        # async I/O only: many in flight is fine; above max_pending_requests the app itself answers 429
        max_ongoing_requests=cfg.max_pending_requests + 64,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    )
    from cluster.config import to_dict
    return ingress.bind(engine, model_dir, to_dict(cfg))


def build_app(args: dict) -> Application:
    """Application builder for ``serve run`` / KubeRay: args = {"config": recipe path (default: the tiny-cpu
    recipe), "overrides": ["serve.port=8000", ...], "model": model dir (default: the recipe's serve.model)}."""
    unknown = set(args) - {"config", "overrides", "model"}
    if unknown:
        raise ValueError(f"build_app: unknown args {sorted(unknown)}; expected config, overrides, model")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):  # `serve run serve.app:build_app overrides="a=1 b=2"` passes strings
        overrides = shlex.split(overrides)
    recipe = load_recipe(args.get("config"), list(overrides))
    model_dir = args.get("model") or recipe.serve.model
    if not model_dir:
        raise ValueError("build_app: no model: pass args.model or set serve.model in the recipe")
    return build_from_config(recipe.serve, model_dir)
