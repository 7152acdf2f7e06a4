"""The SFT ``TrainTask`` pieces for the shared engine (``pipelines.train.engine``): module-level functions bound
with ``functools.partial``, so the task pickles to Ray Train workers.

The driver tokenizes once into ``<stage_dir>/data/{train,validation}.json`` (lists of [ids, labels], see
``pipelines.chat.splits``); each worker reads them.
"""
from __future__ import annotations

import torch

from pipelines.chat.records import IGNORE
from pipelines.chat.splits import load_split, rank_order


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pad tokens get attention 0 and label IGNORE."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_batches(split: str, rank: int, world_size: int, epoch: int, *, data_dir: str, micro_batch_size: int,
                pad_id: int, seed: int):
    rows = load_split(data_dir, split)
    order = rank_order(len(rows), split, rank, world_size, epoch, seed)
    for start in range(0, len(order) - micro_batch_size + 1, micro_batch_size):  # full micro-batches only
        yield collate([rows[i] for i in order[start:start + micro_batch_size]], pad_id)


def sft_loss(engine, batch: dict[str, torch.Tensor]):
    """Mean next-token cross-entropy over assistant tokens (transformers shifts the labels itself)."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False)
    return out.loss, {}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())
