"""The reward ``TrainTask`` pieces for the shared engine: pairwise loss -log sigmoid(r_chosen - r_rejected - margin).

Each micro-batch holds B chosen rows followed by their B rejected rows, so one forward scores both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.chat.splits import load_split, rank_order
from pipelines.reward.model import sequence_scores


def pad_rows(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reward_batches(split: str, rank: int, world_size: int, epoch: int, *, data_dir: str, micro_batch_size: int,
                   pad_id: int, seed: int):
    pairs = load_split(data_dir, split)
    order = rank_order(len(pairs), split, rank, world_size, epoch, seed)
    for start in range(0, len(order) - micro_batch_size + 1, micro_batch_size):
        chosen = [pairs[i][0] for i in order[start:start + micro_batch_size]]
        rejected = [pairs[i][1] for i in order[start:start + micro_batch_size]]
        yield pad_rows(chosen + rejected, pad_id)


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # The plain module (DeepSpeed's engine wraps it): we read the head at each row's last token ourselves.
    scores = sequence_scores(getattr(model, "module", model), batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def pairwise_loss(engine, batch: dict[str, torch.Tensor], *, margin: float = 0.0):
    chosen, rejected = pair_scores(engine, batch)
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - margin).mean()
    return loss, {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}


@torch.no_grad()
def evaluate_pairs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16) -> dict:
    """Held-out pairwise accuracy (chosen scored above rejected) and mean margin r_chosen - r_rejected."""
    model.eval()
    diffs = []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        chosen, rejected = pair_scores(model, pad_rows([c for c, _ in part] + [r for _, r in part], pad_id))
        diffs.append(chosen - rejected)
    diff = torch.cat(diffs)
    return {"val_accuracy": float((diff > 0).float().mean()), "val_margin": float(diff.mean()),
            "val_pairs": len(pairs)}
