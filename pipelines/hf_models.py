"""Hugging Face models of the alignment stages: load a causal LM, put a scalar head on its body (reward model,
PPO critic), load a reward model, and export trained weights as a model dir with its tokenizer.

Shared by sft, reward and ppo (``pipelines.chat`` holds their shared data code), so none imports another.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def model_max_len(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]


def load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def init_reward_model(lm_dir: str | Path):
    """A reward model from a causal LM dir: its body, plus a fresh scalar head."""
    from transformers import LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers reports the fresh head as MISSING: that is the point here
    try:
        return LlamaForSequenceClassification.from_pretrained(str(lm_dir), num_labels=1)
    finally:
        hf_logging.set_verbosity(level)


def load_reward_model(path: str | Path):
    from transformers import AutoModelForSequenceClassification

    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"reward model: no config.json in {path}")
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    if model.config.num_labels != 1:
        raise ValueError(f"reward model: {path} has num_labels={model.config.num_labels}, expected 1")
    return model


def export_hf_model(state_dict: dict[str, torch.Tensor], out_dir: Path, *, base_dir: str, kind: str = "causal") -> None:
    """Write trained weights as a Hugging Face model dir (atomically: staged, then renamed), with the tokenizer.

    ``kind``: "causal" (``AutoModelForCausalLM``) or "reward" (``LlamaForSequenceClassification``, 1 label).
    """
    from transformers import AutoTokenizer

    from pipelines.hf_export import staged_directory

    model = load_causal_lm(base_dir) if kind == "causal" else init_reward_model(base_dir)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embedding
        raise RuntimeError(f"export: weights do not fit {base_dir}: missing {missing}, unexpected {unexpected}")
    with staged_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
