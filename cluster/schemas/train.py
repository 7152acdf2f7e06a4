from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class TrainConfig:
    """What every DeepSpeed training stage (pretrain, sft, reward) shares."""

    num_workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    # adamw: torch AdamW for every parameter. muon: Muon (momentum orthogonalized by Newton-Schulz) for the
    # transformer blocks' matrices at muon_lr, AdamW at lr for embeddings, LM head and norms (modded-nanogpt).
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4  # the schedule scales every group alike: Muon ends at muon_lr * min_lr / lr
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] | None = None
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    # torch.compile the model (DeepSpeed's engine.compile: inductor, in place, so checkpoints and exports keep
    # their parameter names). Costs a one-off compile at the first step (and the first eval).
    compile: bool = False
    eval_every: int = 25
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 1
    stop_at_step: int | None = None  # end this invocation there (checkpointed, no export); run again to go on
    deepspeed_config: str | None = None  # expert JSON merged over the derived config

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params: parameter offload needs zero_stage=3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs zero_stage >= 1")
        for name in ("num_workers", "cpus_per_worker", "micro_batch_size", "grad_accum", "max_steps",
                     "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            raise ValueError(f"stop_at_step: must be in [1, max_steps={self.max_steps}], got {self.stop_at_step}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer: must be adamw or muon, got {self.optimizer!r}")
        if self.muon_lr <= 0:
            raise ValueError(f"muon_lr: must be > 0, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.optimizer == "muon" and self.offload_optimizer:
            raise ValueError("offload_optimizer: not supported with optimizer=muon (DeepSpeed's offloaded Muon "
                             "path is untested here)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: must be <= lr ({self.lr}), got {self.min_lr}")


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    pipeline_stages: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pipeline_stages < 1:
            raise ValueError(f"pipeline_stages: must be >= 1, got {self.pipeline_stages}")
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            raise ValueError(
                f"pipeline_stages: DeepSpeed pipeline parallelism works with zero_stage 0 or 1, got {self.zero_stage}")
        if self.pipeline_stages > 1 and self.num_workers % self.pipeline_stages:
            raise ValueError(
                f"pipeline_stages: num_workers={self.num_workers} must be a multiple of {self.pipeline_stages}")
