"""The pretraining ``TrainTask``: next-token cross-entropy of the recipe's model over the shards."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.schemas.model import ModelConfig
from cluster.schemas.train import PretrainConfig
from pipelines.hf_export import HFExporter
from pipelines.model import build_model, flops_per_token, layer_flops_per_token
from pipelines.pretrain.shards import ShardBatches
from pipelines.train.task import TrainTask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (in fp32 whatever the training precision)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def lm_step_loss(model_engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    inputs, labels = batch
    return lm_loss(model_engine(inputs), labels), {}


def model_layers(model) -> list:
    return model.as_layers()


def pretrain_task(model_cfg: ModelConfig, cfg: PretrainConfig, manifest: dict, shards_dir: str | Path,
                  seed: int) -> TrainTask:
    vocab_size = int(manifest["vocab_size"])
    seq_len = int(manifest["seq_len"]) - 1  # inputs and labels are the sequence shifted by one
    return TrainTask(
        build_model=functools.partial(build_model, model_cfg, vocab_size, seed),
        loss_fn=lm_step_loss,
        batches=ShardBatches(shards_dir, cfg.micro_batch_size, seed),
        export=HFExporter(model_cfg, vocab_size, manifest["tokenizer_dir"]),
        flops_per_token=flops_per_token(model_cfg, vocab_size, seq_len),
        pipeline_layers=model_layers,
        pipeline_loss=lm_loss,
        pipeline_costs=layer_flops_per_token(model_cfg, vocab_size, seq_len),
    )
