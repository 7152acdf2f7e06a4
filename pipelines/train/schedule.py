"""Learning-rate schedule: linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``.

Hand-written rather than DeepSpeed's ``WarmupCosineLR`` because that one starts warmup at lr 0 (a wasted first
step), rejects ``warmup_steps: 0`` and cannot express an absolute ``min_lr``; this is a pure function wrapped in
torch's ``LambdaLR``, whose state DeepSpeed saves and restores with the engine.
"""
from __future__ import annotations

import math

import torch

from cluster.schemas.train import TrainConfig


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate used for optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
