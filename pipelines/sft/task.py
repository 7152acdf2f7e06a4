"""The SFT ``TrainTask`` pieces for the shared engine (``pipelines.train.engine``): module-level functions bound
with ``functools.partial``, so the task pickles to Ray Train workers.

The driver tokenizes once and writes ``<stage_dir>/data/{train,validation}.json`` (lists of [ids, labels]);
each worker reads them (a shared filesystem on a real cluster, like the run dir itself).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from cluster.config import atomic_write_json
from pipelines.sft.data import IGNORE

SPLITS = ("train", "validation")


def save_split(data_dir: Path, split: str, rows: list[tuple[list[int], list[int]]]) -> Path:
    path = Path(data_dir) / f"{split}.json"
    atomic_write_json(path, [[ids, labels] for ids, labels in rows])
    return path


@functools.lru_cache(maxsize=4)
def load_split(data_dir: str, split: str) -> list[tuple[list[int], list[int]]]:
    return [(ids, labels) for ids, labels in json.loads((Path(data_dir) / f"{split}.json").read_text())]


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


def rank_order(n: int, split: str, rank: int, world_size: int, epoch: int, seed: int) -> list[int]:
    """This rank's row indices for one epoch: a seeded shuffle per epoch (train only), then every world_size-th."""
    if split == "train":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    else:
        order = list(range(n))
    return order[rank::world_size]


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


def load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def export_hf_model(state_dict: dict[str, torch.Tensor], out_dir: Path, *, base_dir: str, kind: str = "causal",
                    card=None) -> None:
    """Write trained weights as a Hugging Face model dir (atomically: staged, then renamed), with the tokenizer
    and the model card (``card``: a ``pipelines.model_card.CardInfo``).

    ``kind``: "causal" (``AutoModelForCausalLM``) or "reward" (``LlamaForSequenceClassification``, 1 label).
    """
    from transformers import AutoTokenizer

    from pipelines.hf_export import staged_directory
    from pipelines.model_card import write_model_card
    from pipelines.reward.model import init_reward_model

    model = load_causal_lm(base_dir) if kind == "causal" else init_reward_model(base_dir)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embedding
        raise RuntimeError(f"export: weights do not fit {base_dir}: missing {missing}, unexpected {unexpected}")
    with staged_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        write_model_card(tmp, card)
