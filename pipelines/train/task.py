"""``TrainTask``: what a training stage plugs into the shared engine (see ``pipelines.train.engine``)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# (split, data_rank, data_world_size, epoch) -> batches of that rank for that epoch, in a fixed order.
BatchesFn = Callable[[str, int, int, int], Iterable[Any]]
# (model_engine, batch) -> (scalar loss, extra float metrics); the engine is called like the model.
LossFn = Callable[[Any, Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainTask:
    """Everything stage-specific about a training run. Must pickle (it is shipped to Ray workers): use
    module-level functions or ``functools.partial`` of them, never lambdas or closures.

    - ``build_model()``: a fresh ``nn.Module`` (same weights on every rank: the engine seeds torch first).
    - ``loss_fn(model_engine, batch)``: forward + loss for one micro-batch (tensors already on the device).
    - ``batches(split, rank, world_size, epoch)``: the micro-batches of one data-parallel rank for one pass
      over ``split`` ("train" or "validation"); deterministic, so the engine can resume mid-epoch by skipping.
    - ``count_tokens(batch)``: tokens in a micro-batch, for tokens/s and MFU (default: numel of the first tensor).
    - ``export(full_state_dict, out_dir)``: write the trained model (e.g. Hugging Face format) on rank 0.
    - ``flops_per_token``: training FLOPs per token (forward + backward) for the MFU estimate; 0 disables it.
    - ``pipeline_layers(model)`` and ``pipeline_loss(outputs, labels)``: only for DeepSpeed pipeline
      parallelism: the model as an ordered list of one-tensor-in/one-tensor-out submodules of ``model``, and
      the loss on the last stage; pipeline batches must then be ``(inputs, labels)`` tensor pairs.
    - ``pipeline_costs``: optional relative compute cost of each of those layers (e.g. training FLOPs per token);
      the stages are then balanced on it instead of on parameter counts (see ``builder.cost_balanced_pipeline``).
    """

    build_model: Callable[[], nn.Module]
    loss_fn: LossFn
    batches: BatchesFn
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None
    count_tokens: Callable[[Any], int] | None = None
    flops_per_token: float = 0.0
    pipeline_layers: Callable[[nn.Module], list[nn.Module]] | None = None
    pipeline_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pipeline_costs: list[float] | None = None


def count_tokens(task: TrainTask, batch: Any) -> int:
    if task.count_tokens is not None:
        return int(task.count_tokens(batch))
    return int(first_tensor(batch).numel())


def first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return first_tensor(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return first_tensor(batch[0])
    raise TypeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
