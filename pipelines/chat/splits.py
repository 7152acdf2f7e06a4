"""Tokenized train/validation splits on disk: the driver tokenizes once and writes
``<stage_dir>/data/{train,validation}.json`` (lists of rows); each Ray Train worker reads them (a shared
filesystem on a real cluster, like the run dir itself) and takes its own rows per epoch."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from cluster.config import atomic_write_json

SPLITS = ("train", "validation")


def save_split(data_dir: Path, split: str, rows: list[tuple[list[int], list[int]]]) -> Path:
    path = Path(data_dir) / f"{split}.json"
    atomic_write_json(path, [[ids, labels] for ids, labels in rows])
    return path


@functools.lru_cache(maxsize=4)
def load_split(data_dir: str, split: str) -> list[tuple[list[int], list[int]]]:
    return [(ids, labels) for ids, labels in json.loads((Path(data_dir) / f"{split}.json").read_text())]


def rank_order(n: int, split: str, rank: int, world_size: int, epoch: int, seed: int) -> list[int]:
    """This rank's row indices for one epoch: a seeded shuffle per epoch (train only), then every world_size-th."""
    if split == "train":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    else:
        order = list(range(n))
    return order[rank::world_size]
