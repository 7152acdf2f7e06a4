"""The shared training engine: a stage describes WHAT to train as a ``TrainTask``; ``fit`` runs it as a Ray Train
``TorchTrainer`` whose workers each build a DeepSpeed engine.

Public API (used by pretrain, SFT and reward training)::

    from pipelines.train.engine import TrainTask, fit

    task = TrainTask(build_model=partial(build_model, cfg.model, vocab, seed),   # module-level callables only
                     loss_fn=my_loss,            # (model_engine, batch) -> (loss, {"acc": ...})
                     batches=partial(my_batches, data_dir, micro_batch_size),  # (split, rank, world, epoch)
                     export=partial(export_hf, cfg=..., vocab_size=..., tokenizer_dir=..., ),  # (state, out_dir)
                     flops_per_token=flops_per_token(cfg.model, vocab, seq_len))
    summary = fit(task, recipe.sft, ctx.stage_dir("sft"), seed=recipe.seed,   # on the Ray the CLI started
                  export_dir=ctx.run_dir.model_dir("sft"))

What ``fit`` gives every stage, all from the stage's ``TrainConfig``:
- data parallelism over ``num_workers`` Ray workers (gloo on CPU, NCCL on GPU), ZeRO stage 0-3, optimizer /
  parameter offload, precision, and DeepSpeed pipeline parallelism (``pipeline_stages``, pretraining);
- torch AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation and clipping;
- metrics per step (loss, lr, grad_norm, tokens_per_s, mfu) and per eval (val_loss, val_ppl) to
  ``<stage_dir>/metrics.jsonl`` + TensorBoard (rank 0) and to Ray Train;
- checkpoints every ``checkpoint_every`` steps and at the end via Ray Train (keep the last
  ``keep_checkpoints``); calling ``fit`` again on the same ``stage_dir`` resumes from the latest one (exactly:
  weights, optimizer, scheduler, data position, RNG), and up to ``max_failures`` worker-group crashes are
  restarted from it;
- at the end, the consolidated weights (gathered from ZeRO-3 partitions or pipeline stages) passed to
  ``task.export(state_dict, export_dir)`` on rank 0.

Returns a summary dict: steps, final loss / val_loss, tokens/s, checkpoint path.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from cluster.rundir import read_metrics
from cluster.runtime import connected_ray, storage_path
from cluster.schemas.train import TrainConfig
from cluster.storage import location
from pipelines.train.ds_config import build_ds_config
from pipelines.train.shm import skip_cpu_shm_comm_build
from pipelines.train.task import TrainTask

__all__ = ["TrainTask", "build_ds_config", "fit", "skip_cpu_shm_comm_build", "summarize"]

log = logging.getLogger("raylm")


def _scaling(cfg: TrainConfig):
    from ray.train import ScalingConfig

    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.placement_strategy)


def fit(task: TrainTask, cfg: TrainConfig, stage_dir, *, seed: int = 0, pipeline_stages: int = 1,
        export_dir: str | Path | None = None, name: str | None = None) -> dict:
    """Train ``task`` with ``cfg`` on this process's Ray cluster (``cluster.runtime.init_ray`` started it); Ray
    Train's run directory is ``stage_dir`` itself (``storage_path`` = its parent, the run dir; ``name``
    defaults to its basename, e.g. "pretrain"). ``stage_dir`` and ``export_dir`` may be object-store URIs
    (``cluster.storage``): Ray Train then uploads the checkpoints there itself, and the workers write metrics and
    the export through pyarrow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_worker

    stage_dir = location(stage_dir).resolve()
    stage_dir.mkdir(parents=True, exist_ok=True)
    build_ds_config(cfg, cfg.num_workers, pipeline_stages)  # fail on a bad expert JSON before Ray starts
    connected_ray()  # fail here: TorchTrainer would start a bare local cluster of its own
    backend = "nccl" if cfg.gpus_per_worker > 0 else "gloo"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"task": task, "cfg": cfg, "seed": seed, "pipeline_stages": pipeline_stages,
                           "backend": backend, "stage_dir": str(stage_dir),
                           "export_dir": str(location(export_dir).resolve()) if export_dir else None},
        scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=name or stage_dir.name, storage_path=storage_path(stage_dir.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return summarize(stage_dir, checkpoint)


def summarize(stage_dir, checkpoint: str | None = None) -> dict:
    """The final numbers of a stage from its metrics.jsonl (the last record per step wins: a restarted
    worker group re-logs the steps after its checkpoint)."""
    by_step = {r["step"]: r for r in read_metrics(stage_dir) if "step" in r}
    if not by_step:
        return {"steps": 0, "checkpoint": checkpoint}
    last = by_step[max(by_step)]
    evals = [r for _, r in sorted(by_step.items()) if "val_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in by_step.values() if "tokens_per_s" in r)
    summary = {"steps": last["step"], "loss": round(last["loss"], 4),
               "tokens_per_s": round(speeds[len(speeds) // 2]) if speeds else None, "checkpoint": checkpoint}
    if evals:
        summary["val_loss"] = round(evals[-1]["val_loss"], 4)
        summary["val_ppl"] = round(math.exp(min(evals[-1]["val_loss"], 50.0)), 2)
    return summary
