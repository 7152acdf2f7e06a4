"""Checkpoints through Ray Train: each rank saves its DeepSpeed shard (model, optimizer, LR scheduler) plus its
own data position and RNG states into a temp dir and reports it; Ray merges the ranks' files into one
``checkpoint_*`` directory under the run dir, registers it only once every rank has uploaded (so a crash never
leaves a checkpoint that looks complete), keeps the last K, and hands it back via ``get_checkpoint()`` on
resume or after a worker-group restart.
"""
from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch

DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's sub-directory inside the checkpoint


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch of the data stream."""

    step: int = 0
    epoch: int = 0
    index: int = 0


def worker_state_file(rank: int) -> str:
    return f"worker_state_rank{rank}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_and_report(engine, metrics: dict, position: Position, rank: int) -> None:
    """Collective: every rank must call it at the same step."""
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, client_state={"step": position.step})
        torch.save({"position": asdict(position), "rng": rng_state()}, Path(tmp) / worker_state_file(rank))
        # SYNC upload (the default): the files are in storage before report returns and tmp is removed.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, rank: int) -> Position | None:
    """Load the latest checkpoint of this run into ``engine``; None when the run starts fresh."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state_path = Path(directory) / worker_state_file(rank)
        if not state_path.exists():
            raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {rank}: it was written by a "
                               "run with fewer workers; resume with the same num_workers/pipeline_stages")
        loaded, _ = engine.load_checkpoint(directory, tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no '{DEEPSPEED_TAG}' state in it")
        # weights_only=False: the file holds numpy/python RNG tuples, and it is our own file.
        state = torch.load(state_path, weights_only=False)
    set_rng_state(state["rng"])
    return Position(**state["position"])
