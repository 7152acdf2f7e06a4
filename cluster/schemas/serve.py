from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4
    upscale_delay_s: float = 10
    downscale_delay_s: float = 60

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas: need 0 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas} > {self.max_replicas}")


@dataclass(kw_only=True)
class ServeConfig:
    model: str | None = None  # HF model dir; None: the latest stage of the run that has a model
    engine: Literal["hf", "vllm"] = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "raylm"
    api_key_env: str = "RAYLM_API_KEY"
    api_key_file: str | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    max_ongoing_requests: int = 32
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    request_timeout_s: float = 60
    max_prompt_tokens: int = 192
    max_new_tokens: int = 128
    max_body_bytes: int = 1_000_000
    demo: bool = True
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
