"""The reward model's accuracy on held-out preference pairs: the reward stage's own validation split (the same
held-out questions as SFT and PPO, or a hash split of ``reward.data``), scored on the exported model."""
from __future__ import annotations

import os
import time
from pathlib import Path

from cluster.schemas.rlhf import RewardConfig
from pipelines.eval.model_eval import weights_sha256


def evaluate_reward_model(path: str, cfg: RewardConfig, seed: int) -> dict:
    """{"record": results.json's ``reward_model`` entry, "seconds", "pid"}."""
    from transformers import AutoTokenizer

    from pipelines.hf_models import load_reward_model
    from pipelines.reward.data import encode_pairs
    from pipelines.reward.stage import split_preferences
    from pipelines.reward.task import evaluate_pairs

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, held_out = split_preferences(cfg.data, cfg.val_fraction, seed)
    rows = encode_pairs(tokenizer, held_out, cfg.max_len)
    scores = evaluate_pairs(load_reward_model(path), rows, tokenizer.pad_token_id)
    record = {"path": path, "weights_sha256": weights_sha256(Path(path)), "pairs": scores["val_pairs"],
              "data": cfg.data or "builtin", "accuracy": round(scores["val_accuracy"], 5),
              "margin": round(scores["val_margin"], 5)}
    return {"record": record, "seconds": round(time.perf_counter() - started, 2), "pid": os.getpid()}
