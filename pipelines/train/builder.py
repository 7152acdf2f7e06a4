"""Building one rank's DeepSpeed engine from a ``TrainTask`` and a ``TrainConfig`` (no Ray needed here, so
benchmarks can build the very same engine in a plain process)."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from cluster.schemas.train import TrainConfig
from pipelines.train.ds_config import build_ds_config
from pipelines.train.schedule import warmup_cosine
from pipelines.train.task import TrainTask


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings, never norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_engine(task: TrainTask, cfg: TrainConfig, world_size: int, pipeline_stages: int):
    import deepspeed

    model = task.build_model()
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.activation_checkpointing
    if pipeline_stages > 1:
        if task.pipeline_layers is None or task.pipeline_loss is None:
            raise ValueError("pipeline_stages: this stage's task does not support pipeline parallelism")
        from deepspeed.pipe import PipelineModule

        # torch's non-reentrant checkpoint: DeepSpeed's default (reentrant) one fails on the first stage, whose
        # input (token ids) does not require grad ("element 0 of tensors does not require grad").
        model = PipelineModule(layers=task.pipeline_layers(model), num_stages=pipeline_stages,
                               loss_fn=task.pipeline_loss, partition_method="parameters",
                               activation_checkpoint_interval=int(cfg.activation_checkpointing),
                               activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False))
    betas = tuple(cfg.betas) if cfg.betas else (0.9, 0.95)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=warmup_cosine(optimizer, cfg),
        config=build_ds_config(cfg, world_size, pipeline_stages))
    if cfg.compile:
        # DeepSpeed's compile (not torch.compile(model) before initialize): it compiles the wrapped module in
        # place (nn.Module.compile), so parameter names, checkpoints and exports are unchanged, and ZeRO-3's
        # gather/release hooks, installed by initialize, stay outside the graphs (DeepSpeed marks them
        # compiler.disable). Plain torch.compile, not DeepCompile, which would JIT-build a native op.
        engine.compile()
    return engine
