"""The PPO/GRPO iteration loop around a ``PPOTrainer``: prompts in, per-step metrics and checkpoints out,
resuming from the newest complete checkpoint when there is one."""
from __future__ import annotations

import logging
from pathlib import Path

from actors.ppo.checkpoint import PPOCheckpoints
from actors.ppo.driver import PPOTrainer, PromptSampler
from cluster.rundir import MetricsLog
from cluster.schemas.rlhf import PPOConfig

log = logging.getLogger("raylm")


def prompts_per_iteration(cfg: PPOConfig) -> int:
    return cfg.rollout_batch_size // cfg.group_size if cfg.algorithm == "grpo" else cfg.rollout_batch_size


def run_iterations(trainer: PPOTrainer, cfg: PPOConfig, prompts: list[list[int]], stage_dir: Path,
                   seed: int = 0) -> dict:
    """Iterations ``resumed + 1 .. cfg.iterations``; returns {"resumed_from", "iterations", "last": metrics}."""
    sampler = PromptSampler(prompts, seed=seed)
    checkpoints = PPOCheckpoints(Path(stage_dir) / "checkpoints")
    state = checkpoints.restore(trainer)
    start = 0
    if state is not None:
        start = state["iteration"]
        sampler.restore(state["sampler"])
        trainer.kl_ctl.value = state["kl_coef"]
        log.info("ppo: resumed from iteration %d (%s)", start, state["tag"])
    metrics = MetricsLog(Path(stage_dir))
    last: dict = {}

    def take() -> list[list[int]]:
        batch = sampler.take(prompts_per_iteration(cfg))
        if cfg.algorithm == "grpo":
            batch = [p for p in batch for _ in range(cfg.group_size)]  # a group = consecutive samples
        return batch

    try:
        batch = take() if start < cfg.iterations else []
        for it in range(start + 1, cfg.iterations + 1):
            # The sampler's state after this iteration's prompts: a checkpoint resumes at the next ones, even
            # when (async_rollout) they were taken already, to be sampled while this iteration trains.
            sampler_state = sampler.state()
            next_batch = take() if cfg.async_rollout and it < cfg.iterations else None
            last = trainer.step(batch, next_batch)
            metrics.log({"step": it, **last})
            log.info("ppo %d/%d: reward %.3f kl %.4f (%.1f samples/s)", it, cfg.iterations, last["reward_mean"],
                     last["kl"], last["samples_per_s"])
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                checkpoints.save(trainer, it, {"sampler": sampler_state, "kl_coef": trainer.kl_ctl.value})
            batch = next_batch if next_batch is not None else (take() if it < cfg.iterations else [])
    finally:
        metrics.close()
    return {"resumed_from": start, "iterations": cfg.iterations, "last": last}
