"""Reading the packed token shards (``<run-dir>/data/shards``) written by ``raylm data``.

Each data-parallel rank loads only its own contiguous slice of a split's sequences (reading just the parquet
files that slice touches), reshuffles it every epoch from (seed, epoch, rank), and yields micro-batches of
``(inputs, labels)`` = (tokens[:, :-1], tokens[:, 1:]): the pair DeepSpeed's pipeline engine expects too.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cluster.storage import ObjectPath, location

MANIFEST_KEYS = ("seq_len", "vocab_size", "tokenizer_dir", "eos_id", "unigram_entropy_nats", "splits")


def read_manifest(shards_dir: str | Path | ObjectPath) -> dict:
    """The validated manifest; errors name the file and the key."""
    shards_dir = location(shards_dir)
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest; run `raylm data` on this run dir first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    for split in ("train", "validation"):
        info = manifest["splits"].get(split)
        if not info or not info.get("files"):
            raise ValueError(f"{path}: splits.{split}: no files")
        for name in info["files"]:
            if not (shards_dir / name).is_file():
                raise FileNotFoundError(f"{path}: splits.{split}: shard {name} is missing")
    return manifest


def rank_slice(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of ``total`` rows; shares differ by at most one row."""
    return total * rank // world_size, total * (rank + 1) // world_size


def load_rows(shards_dir: Path | ObjectPath, files: list[str], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the concatenated files as int32 [rows, seq_len], reading only the files needed."""
    parts, offset = [], 0
    for name in files:
        with (location(shards_dir) / name).open("rb") as handle:  # local file or object, pyarrow reads both
            shard = pq.ParquetFile(handle)
            rows = shard.metadata.num_rows
            lo, hi = max(start, offset), min(stop, offset + rows)
            table = shard.read(columns=["input_ids"]) if lo < hi else None
        if table is not None:
            column = table.column("input_ids").slice(lo - offset, hi - lo)
            flat = column.combine_chunks().values.to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(hi - lo, -1).astype(np.int32, copy=False))
        offset += rows
        if offset >= stop:
            break
    if not parts:
        return np.zeros((0, 0), dtype=np.int32)
    return np.concatenate(parts)


class ShardBatches:
    """``TrainTask.batches`` over the shards: ``(split, rank, world_size, epoch) -> (inputs, labels)``.

    Picklable (plain fields); each worker process loads its slice once and keeps it.
    """

    def __init__(self, shards_dir: str | Path, micro_batch_size: int, seed: int):
        self.shards_dir = str(shards_dir)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self._rows: dict[tuple, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": {}}  # ship the recipe, not loaded data

    def rows(self, split: str, rank: int, world_size: int) -> np.ndarray:
        key = (split, rank, world_size)
        if key not in self._rows:
            manifest = read_manifest(self.shards_dir)
            info = manifest["splits"][split]
            start, stop = rank_slice(info["sequences"], rank, world_size)
            self._rows[key] = load_rows(location(self.shards_dir), info["files"], start, stop)
        return self._rows[key]

    def __call__(self, split: str, rank: int, world_size: int, epoch: int) -> Iterator[tuple]:
        rows = self.rows(split, rank, world_size)
        order = np.arange(len(rows))
        if split == "train":
            order = np.random.default_rng([self.seed, epoch, rank]).permutation(len(rows))
        mbs = self.micro_batch_size
        for i in range(0, len(order) - mbs + 1, mbs):  # the last partial micro-batch is dropped
            tokens = torch.from_numpy(rows[order[i:i + mbs]].astype(np.int64))
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
