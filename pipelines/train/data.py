"""The endless, resumable stream of one data-parallel rank's micro-batches."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from pipelines.train.task import TrainTask, count_tokens, to_device


class BatchStream:
    """Epoch after epoch of ``task.batches(split, rank, world_size, epoch)``, tracking (epoch, index) so a
    resumed run continues with exactly the micro-batch that comes next."""

    def __init__(self, task: TrainTask, split: str, rank: int, world_size: int, device: torch.device,
                 epoch: int = 0, index: int = 0):
        self.task, self.split, self.rank, self.world_size, self.device = task, split, rank, world_size, device
        self.epoch, self.index = epoch, index
        self.tokens = 0  # tokens yielded so far (for tokens/s)
        self._iter: Iterator[Any] | None = None

    def _open(self) -> Iterator[Any]:
        batches = iter(self.task.batches(self.split, self.rank, self.world_size, self.epoch))
        return itertools.islice(batches, self.index, None)  # skip what a resumed run already consumed

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._iter is None:
                self._iter = self._open()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch, self.index, self._iter = self.epoch + 1, 0, None
                continue
            self.index += 1
            self.tokens += count_tokens(self.task, batch)
            return to_device(batch, self.device)
        raise ValueError(f"the {self.split} split has no batches for data rank {self.rank} of {self.world_size}: "
                         "more data, fewer workers or a smaller micro_batch_size")


def first_batches(task: TrainTask, split: str, rank: int, world_size: int, limit: int) -> list[Any]:
    return list(itertools.islice(task.batches(split, rank, world_size, 0), limit))
