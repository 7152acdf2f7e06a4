"""The pretraining ``TrainTask``: next-token cross-entropy of the recipe's model over the shards."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from cluster.schemas.model import ModelConfig
from cluster.schemas.train import PretrainConfig
from pipelines.hf_export import HFExporter
from pipelines.model import build_model, flops_per_token, layer_flops_per_token, next_token_loss
from pipelines.model_card import CardInfo
from pipelines.pretrain.shards import ShardBatches
from pipelines.train.task import TrainTask


def lm_step_loss(model_engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    inputs, labels = batch
    return model_engine(inputs, labels), {}  # loss inside forward: compiled with the model


def model_layers(model) -> list:
    return model.as_layers()


def pretrain_task(model_cfg: ModelConfig, cfg: PretrainConfig, manifest: dict, shards_dir: str | Path,
                  seed: int, card: CardInfo | None = None) -> TrainTask:
    vocab_size = int(manifest["vocab_size"])
    seq_len = int(manifest["seq_len"]) - 1  # inputs and labels are the sequence shifted by one
    return TrainTask(
        build_model=functools.partial(build_model, model_cfg, vocab_size, seed),
        loss_fn=lm_step_loss,
        batches=ShardBatches(shards_dir, cfg.micro_batch_size, seed),
        export=HFExporter(model_cfg, vocab_size, manifest["tokenizer_dir"], card),
        flops_per_token=flops_per_token(model_cfg, vocab_size, seq_len),
        pipeline_layers=model_layers,
        pipeline_loss=next_token_loss,  # the last stage's loss: the one the whole model computes
        pipeline_costs=layer_flops_per_token(model_cfg, vocab_size, seq_len),
    )
