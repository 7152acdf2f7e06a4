"""The DeepSpeed config, derived from a stage's ``TrainConfig`` (one source of truth).

An expert JSON file (``deepspeed_config`` in the recipe) is merged over the derived dict, key by key, so it can
change anything; the batch-size keys it sets must still agree with the recipe (DeepSpeed checks that).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.schemas.train import TrainConfig

# DeepSpeed prints a progress line every `steps_per_print` steps; our MetricsLog does that job.
_QUIET_STEPS = 10**9


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` wins; nested mappings are merged rather than replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(*, micro_batch_size: int, data_parallel: int, grad_clip: float, zero_stage: int,
                     precision: str, grad_accum: int = 1, offload_optimizer: bool = False,
                     offload_params: bool = False, on_gpu: bool = False, muon: bool = False) -> dict:
    """The derived DeepSpeed config from the few values it depends on: what the stages' ``TrainConfig`` and the
    PPO roles (``actors.ppo.roles``) both build their engines with."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero_stage == 3 and muon:
        # ZeRO-3 refuses Muon with reduce-scatter ("Muon and reduce scatter cannot be used together"): Muon
        # needs each matrix's whole gradient, so gradients are all-reduced instead.
        zero["reduce_scatter"] = False
    if zero_stage == 3:
        # Gather the full fp16/bf16 weights on save, so `save_16bit_model`/export need no offline step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * data_parallel,
        # With Muon, ZeRO-1/2 compute the clipping norm over Muon's already-orthogonalized updates (norm about
        # sqrt(rows) per matrix), so a clip of 1.0 shrank every Muon step and ZeRO-2 trained differently from
        # ZeRO-0 (loss 5.01 vs 4.74 after 8 steps of the test model; equal, 4.7387, without clipping).
        # Orthogonalized updates are normalized by construction: Muon runs unclipped.
        "gradient_clipping": 0.0 if muon else grad_clip,
        "zero_optimization": zero,
        # The optimizer is torch AdamW passed by the client: a config optimizer would JIT-compile FusedAdam
        # (minutes on CPU). ZeRO only trusts its own optimizers unless told otherwise.
        "zero_allow_untested_optimizer": True,
        # With optimizer offload DeepSpeed insists on its compiled CPUAdam unless this is off.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def build_ds_config(cfg: TrainConfig, world_size: int, pipeline_stages: int = 1) -> dict:
    """DeepSpeed config for ``world_size`` ranks; with pipeline parallelism the data-parallel size shrinks."""
    if world_size % pipeline_stages:
        raise ValueError(f"num_workers: {world_size} workers cannot hold {pipeline_stages} pipeline stages")
    config = deepspeed_config(micro_batch_size=cfg.micro_batch_size, data_parallel=world_size // pipeline_stages,
                              grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage, precision=cfg.precision,
                              grad_accum=cfg.grad_accum, offload_optimizer=cfg.offload_optimizer,
                              offload_params=cfg.offload_params, on_gpu=cfg.gpus_per_worker > 0,
                              muon=cfg.optimizer == "muon")
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            override = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"deepspeed_config: file {path} not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"deepspeed_config: {path} is not valid JSON: {exc}") from None
        if not isinstance(override, dict):
            raise ValueError(f"deepspeed_config: {path} must hold a JSON object")
        config = deep_merge(config, override)
    return config
