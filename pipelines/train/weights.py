"""The full, consolidated model weights on rank 0, whatever the sharding (ZeRO-3 partitions, pipeline stages)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pipelines.train.task import TrainTask


def _cpu_copy(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def full_state_dict(engine, task: TrainTask, pipeline: bool) -> dict[str, torch.Tensor] | None:
    """Collective over all ranks; returns the plain model's ``state_dict`` on rank 0 and None elsewhere."""
    rank = dist.get_rank()
    if pipeline:
        return _merge_pipeline_stages(engine, task, rank)
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        # Temporarily gathers every partitioned parameter on all ranks (ZeRO-3's own consolidation API).
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _cpu_copy(module.state_dict()) if rank == 0 else None
    return _cpu_copy(module.state_dict()) if rank == 0 else None


def _merge_pipeline_stages(engine, task: TrainTask, rank: int) -> dict[str, torch.Tensor] | None:
    # PipelineModule names each local layer by its global index ("3.attn.wq.weight"); one data-parallel
    # replica of each stage contributes its layers, and rank 0 loads them into a fresh plain model.
    local = _cpu_copy(engine.module.state_dict()) if engine.grid.data_parallel_id == 0 else {}
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    if rank != 0:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    model = task.build_model()
    for index, layer in enumerate(task.pipeline_layers(model)):
        prefix = f"{index}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)})
    return _cpu_copy(model.state_dict())
