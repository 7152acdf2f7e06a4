from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(obj, name)}")


@dataclass(kw_only=True)
class AutoscalingConfig:
    """Serve autoscaling of the replicas that hold the model (see serve/app.py)."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4
    upscale_delay_s: float = 10
    downscale_delay_s: float = 60

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas: need 0 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas} > {self.max_replicas}")
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas: must be >= 1, got {self.max_replicas}")
        _positive(self, "target_ongoing_requests")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def to_serve(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}


@dataclass(kw_only=True)
class ServeConfig:
    model: str | None = None  # HF model dir; None: <run-dir>/ppo/model, else the latest stage with a model
    engine: Literal["hf", "vllm"] = "hf"  # vllm: vLLM's engine behind the same ingress (serve/vllm_engine.py)
    # vllm: a Python with vllm for the engine replicas (Ray runtime_env py_executable; the same Ray version);
    # None: the driver's own. `python -m serve.vllm_engine --setup` makes ~/.cache/raylm/vllm-venv.
    engine_python: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)  # vllm: extra AsyncEngineArgs (dtype, ...)
    engine_env: dict[str, str] = field(default_factory=dict)  # env vars of the engine replicas (VLLM_CPU_...)
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "raylm"  # the id clients pass as "model"
    # The API key itself never lives in the recipe: it is read from this env var, else from this file.
    api_key_env: str = "RAYLM_API_KEY"
    api_key_file: str | None = None
    # Replicas that hold the model, autoscaled: with engine=hf the OpenAIIngress replicas (the HTTP side, and the
    # model in an engine process each replica spawns: torch takes num_cpus threads there, and the HTTP side uses up
    # to one more core under load), with engine=vllm the LLMEngine replicas
    num_cpus: float = 1
    num_gpus: float = 0
    max_ongoing_requests: int = 32  # engine=vllm: calls in flight per LLMEngine replica; >= max_batch_size
    max_queued_requests: int = -1  # Serve's queue bound per caller (-1: none); past it Serve's plain 503
    max_batch_size: int = 16
    # How long an idle hf engine waits for company before prefilling a lone arrival. 0: none; waiting 10 ms cost
    # c1 10 ms of TTFT and c16 5 ms for no throughput gain (docs/serving.md)
    batch_wait_timeout_s: float = 0.0
    stream_interval: int = 4  # tokens per streamed message after the first (fewer messages, more throughput)
    # engine=vllm: OpenAIIngress (HTTP + demo) replicas, fixed, light on CPU (tokenizing and JSON only)
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    max_pending_requests: int = 128  # completions in progress per ingress replica; more -> 429
    request_timeout_s: float = 60  # whole request, queueing included; past it -> 503
    max_prompt_tokens: int = 192
    max_new_tokens: int = 128
    max_body_bytes: int = 1_000_000
    max_choices: int = 8  # choices per request: n x the number of prompts (completions take several)
    demo: bool = True  # the Gradio chat demo at /demo
    demo_api_url: str | None = None  # where the demo calls the API; None: http://127.0.0.1:<port>/v1
    # The run report (raylm report) served at /report behind the API key and linked from the demo; None: raylm
    # serve fills in <run-dir>/report/report.html when the run has one.
    report: str | None = None
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    @property
    def ingress_max_ongoing_requests(self) -> int:
        """Serve's cap per OpenAIIngress replica: above max_pending_requests, so a client past that bound gets the
        app's OpenAI-shaped 429 rather than waiting in Serve's queue."""
        return self.max_pending_requests + 64

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        _positive(self, "num_cpus", "max_ongoing_requests", "max_batch_size", "stream_interval", "ingress_replicas",
                  "ingress_num_cpus", "max_pending_requests", "request_timeout_s", "max_prompt_tokens", "max_new_tokens", "max_body_bytes",
                  "max_choices")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests: {self.max_ongoing_requests} < max_batch_size="
                             f"{self.max_batch_size} would keep batches from filling")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ValueError(f"max_queued_requests: must be -1 (unbounded) or > 0, got {self.max_queued_requests}")
        if not self.model_name or "/" in self.model_name and self.model_name.startswith("/"):
            raise ValueError(f"model_name: must be a non-empty id, got {self.model_name!r}")
        if self.engine_python is not None and not self.engine_python.startswith("/"):
            raise ValueError(f"engine_python: must be an absolute path, got {self.engine_python!r}")
        for name in ("engine_python", "engine_args"):
            if self.engine != "vllm" and getattr(self, name):
                raise ValueError(f"{name}: only for serve.engine=vllm (serve.engine is {self.engine!r})")
        if not self.api_key_env:
            raise ValueError("api_key_env: must name an environment variable")
