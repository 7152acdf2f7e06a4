"""The Ray Serve application: ``serve.app:build_app`` (the import path KubeRay's RayService uses).

One application, APP_NAME; its deployments' names are stable (serveConfigV2 and dashboards refer to them).

``serve.engine: hf`` (default): one deployment, ``OpenAIIngress``, autoscaled from ``serve.autoscaling``. Each
replica holds the HTTP routes (/v1/chat/completions, /v1/completions, /v1/models, /health), the API key check,
input limits, Prometheus metrics, the Gradio demo at /demo, and the model, run by a continuous-batching loop in an
engine process the replica spawns (serve/local_engine.py). No Serve handle sits between a request and the model: measured on the 2-core
machine, a separate engine deployment cost ~1.8x the CPU per streamed token (docs/serving.md).

``serve.engine: vllm``: vLLM's engine runs in a second deployment, ``LLMEngine`` (serve/vllm_engine.py, same
``generate`` contract), in the Python of ``serve.engine_python``; ``OpenAIIngress`` (``ingress_replicas`` fixed
replicas) streams from it through a handle. The HTTP surface is the same either way.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from ray import serve
from ray.serve import Application

from cluster.recipe import load_recipe
from cluster.schemas.serve import ServeConfig

APP_NAME = "raylm"
INGRESS = "OpenAIIngress"
ENGINE = "LLMEngine"


def _ingress_class():
    # Imported here: the ingress pulls in FastAPI/gradio, which the engine replicas need not load.
    from serve.ingress import OpenAIIngress
    return OpenAIIngress


def build_from_config(cfg: ServeConfig, model_dir: str | Path) -> Application:
    """The bound application for a validated ServeConfig and a model dir."""
    model_dir = str(Path(model_dir).resolve())
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"serve: {model_dir} is not a Hugging Face model dir (no config.json)")
    from cluster.config import to_dict

    actor_options: dict = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.engine_env:
        actor_options["runtime_env"] = {"env_vars": dict(cfg.engine_env)}
    ingress = serve.deployment(_ingress_class(), name=INGRESS)
    if cfg.engine == "hf":  # the model lives in the ingress replicas: they scale as the engine would
        return ingress.options(
            autoscaling_config=cfg.autoscaling.to_serve(),
            max_ongoing_requests=cfg.ingress_max_ongoing_requests,
            max_queued_requests=cfg.max_queued_requests,
            ray_actor_options=actor_options,
        ).bind(None, model_dir, to_dict(cfg))

    from serve.vllm_engine import VLLMEngine, require_vllm

    require_vllm(cfg.engine_python)  # here, before Serve starts, not in a replica that retries
    if cfg.engine_python:
        actor_options["runtime_env"] = {**actor_options.get("runtime_env", {}), "py_executable": cfg.engine_python}
    engine_args = {"max_num_seqs": cfg.max_batch_size, **cfg.engine_args}
    engine = serve.deployment(VLLMEngine, name=ENGINE).options(
        autoscaling_config=cfg.autoscaling.to_serve(),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=actor_options,
        # one engine call per completion choice, already in the ingress's access log: no second line per call
        logging_config={"enable_access_log": False},
    ).bind(model_dir, cfg.max_prompt_tokens + cfg.max_new_tokens, cfg.stream_interval, engine_args)
    return ingress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(engine, model_dir, to_dict(cfg))


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
