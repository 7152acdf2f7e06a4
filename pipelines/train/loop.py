"""The per-worker training loop that Ray Train runs on every rank (see ``engine.fit``)."""
from __future__ import annotations

import math
import os
import random
import socket
import time
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from cluster.config import atomic_write_json
from cluster.rundir import MetricsLog
from cluster.schemas.train import TrainConfig
from cluster.storage import location
from pipelines.train.builder import build_engine
from pipelines.train.checkpoint import Position, restore, save_and_report
from pipelines.train.data import BatchStream, first_batches
from pipelines.train.flops import mfu, peak_flops
from pipelines.train.shm import skip_cpu_shm_comm_build
from pipelines.train.task import TrainTask, to_device
from pipelines.train.weights import full_state_dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_dist_env(ctx) -> None:
    # Ray Train has already built the torch process group; DeepSpeed still reads these for device placement.
    os.environ.setdefault("RANK", str(ctx.get_world_rank()))
    os.environ.setdefault("WORLD_SIZE", str(ctx.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(ctx.get_local_world_size()))


def _mean_over_ranks(value: float, device: torch.device, count: float = 1.0) -> float:
    # On the engine's device: NCCL reduces CUDA tensors only (gloo takes CPU ones).
    pair = torch.tensor([value * count, count], dtype=torch.float64, device=device)
    dist.all_reduce(pair)
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")


def train_step(engine, task: TrainTask, stream: BatchStream, cfg: TrainConfig, pipeline: bool
               ) -> tuple[float, dict[str, float]]:
    """One optimizer step (``grad_accum`` micro-batches); returns the mean loss over all ranks and the mean of
    the loss function's extra metrics (e.g. DPO's accuracy and margin), over micro-batches and ranks."""
    if cfg.compile:
        return _train_step(engine, task, stream, cfg, pipeline)
    # compile: false means nothing is compiled. DeepSpeed's Muon kernels are torch.compile'd functions, run in
    # ZeRO's backward (gradient partitioning) and step: on this 2-core CPU compiling them took 120-175 s at the
    # first step, against ~0.1 s per step eager for the test model.
    with torch.compiler.set_stance("force_eager"):
        return _train_step(engine, task, stream, cfg, pipeline)


def _train_step(engine, task: TrainTask, stream: BatchStream, cfg: TrainConfig, pipeline: bool
                ) -> tuple[float, dict[str, float]]:
    if pipeline:
        # PipelineEngine pulls grad_accum micro-batches itself and returns the loss averaged over data ranks.
        return float(engine.train_batch(data_iter=stream)), {}
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    extras: dict[str, torch.Tensor] = {}
    for _ in range(cfg.grad_accum):
        loss, stats = task.loss_fn(engine, next(stream))
        engine.backward(loss)
        engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        # Summed on the device: a float() here would wait for the GPU after every micro-batch, and the host
        # could no longer queue the next micro-batch's kernels while this one runs.
        total += loss.detach().float()
        for key, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=engine.device).detach()
            extras[key] = extras[key] + value if key in extras else value
    keys = sorted(extras)  # the same loss function on every rank: the same keys, reduced in one call
    means = torch.stack([total] + [extras[k] for k in keys]).double() / cfg.grad_accum
    dist.all_reduce(means)
    means = (means / dist.get_world_size()).tolist()
    return means[0], dict(zip(keys, means[1:]))


@torch.no_grad()
def evaluate(engine, task: TrainTask, cfg: TrainConfig, dp_rank: int, dp_world: int, pipeline: bool) -> dict:
    batches = first_batches(task, "validation", dp_rank, dp_world, cfg.eval_batches)
    # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively).
    count = torch.tensor([len(batches)], device=engine.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    batches = batches[: int(count)]
    if not batches:
        return {}
    device = engine.device
    if pipeline:
        loss = engine.eval_batch(iter([to_device(b, device) for b in batches]), num_micro_batches=len(batches))
        val_loss = _mean_over_ranks(float(loss), device)
    else:
        engine.eval()
        total = sum(float(task.loss_fn(engine, to_device(b, device))[0]) for b in batches)
        engine.train()
        val_loss = _mean_over_ranks(total / len(batches), device)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def record_placement(stage_dir, rank: int, world: int) -> None:
    """``workers.json``: where each rank runs (node, host, pid, device), for operators and tests."""
    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, here)
    if rank == 0:
        atomic_write_json(stage_dir / "workers.json", everyone)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` is built by ``engine.fit``."""
    task: TrainTask = config["task"]
    cfg: TrainConfig = config["cfg"]
    pipeline_stages: int = config["pipeline_stages"]
    pipeline = pipeline_stages > 1
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _set_dist_env(ctx)
    torch.set_num_threads(cfg.cpus_per_worker)
    skip_cpu_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend=config["backend"])  # wraps the process group Ray Train made
    record_placement(location(config["stage_dir"]), rank, world)
    seed_everything(config["seed"])
    engine = build_engine(task, cfg, world, pipeline_stages)
    dp_rank, dp_world = (engine.grid.data_parallel_id, engine.grid.data_parallel_size) if pipeline else (rank, world)
    position = restore(engine, rank) or Position()
    stream = BatchStream(task, "train", dp_rank, dp_world, engine.device, position.epoch, position.index)
    log = MetricsLog(location(config["stage_dir"])) if rank == 0 else None
    peak = peak_flops(engine.device)
    peak_total = peak * world if peak else None
    end = cfg.stop_at_step or cfg.max_steps
    while position.step < end:
        # This step's rates: "lr" is AdamW's (with Muon the last groups; builder.muon_optimizer puts Muon's first).
        t0, tokens0, lrs = time.perf_counter(), stream.tokens, engine.get_lr()
        loss, extras = train_step(engine, task, stream, cfg, pipeline)
        seconds = time.perf_counter() - t0
        position = Position(position.step + 1, stream.epoch, stream.index)
        tokens_per_s = (stream.tokens - tokens0) * dp_world / seconds
        record = {"step": position.step, "loss": loss, "lr": lrs[-1], "epoch": stream.epoch,
                  "muon_lr": lrs[0] if cfg.optimizer == "muon" else None,
                  "grad_norm": _grad_norm(engine), "tokens_per_s": tokens_per_s, "step_s": seconds,
                  "mfu": mfu(task.flops_per_token, tokens_per_s, peak_total), **extras}
        last = position.step == end
        if position.step % cfg.eval_every == 0 or last:
            record.update(evaluate(engine, task, cfg, dp_rank, dp_world, pipeline))
        record = {k: v for k, v in record.items() if v is not None}
        if log:
            log.log(record)
        if position.step % cfg.checkpoint_every == 0 or last:
            save_and_report(engine, record, position, rank)
        elif "val_loss" in record:
            # Only evals and checkpoints go to Ray Train: each report waits for the controller to take the
            # previous one, and it polls every 2 s (Ray 2.60), so a report per step would cap training at 0.5
            # steps/s. Every step is in metrics.jsonl and TensorBoard.
            ray.train.report(record)
    if config["export_dir"] and task.export is not None and position.step == cfg.max_steps:
        state = full_state_dict(engine, task, pipeline)  # collective; the full weights on rank 0 only
        if rank == 0:
            task.export(state, location(config["export_dir"]))
    if log:
        log.close()
