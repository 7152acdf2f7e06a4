"""Checkpoints through Ray Train: each rank saves its DeepSpeed shard (model, optimizer, LR scheduler) plus its
own data position and RNG states into a temp dir and reports it; Ray merges the ranks' files into one
``checkpoint_*`` directory under the run dir, registers it only once every rank has uploaded (so a crash never
leaves a checkpoint that looks complete), keeps the last K, and hands it back via ``get_checkpoint()`` on
resume or after a worker-group restart.
"""
from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch

DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's sub-directory inside the checkpoint
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch of the data stream."""

    step: int = 0
    epoch: int = 0
    index: int = 0


def worker_state_file(rank: int) -> str:
    return f"worker_state_rank{rank}.pt"


def rng_state() -> dict:
    """Plain types and tensors only, so ``torch.load(weights_only=True)`` reads it back: numpy's key array as a
    list of ints (Python's state is already a tuple of ints)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _deepspeed_checkpoint_classes() -> list:
    """The classes DeepSpeed pickles beside tensors in its checkpoints (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1/2/3, offload and pipeline checkpoints):
    plain state holders whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside, DeepSpeed's own included (it passes ``weights_only=False``), unpickles only
    tensors, plain containers and DeepSpeed's checkpoint classes: a file planted in a shared run directory cannot
    run code in the training workers. torch's switch for this is an environment variable, read per load."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


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
        with weights_only_loads():
            loaded, _ = engine.load_checkpoint(directory, tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no '{DEEPSPEED_TAG}' state")
            state = torch.load(state_path, weights_only=True)
    set_rng_state(state["rng"])
    return Position(**state["position"])
