"""The reward model: a transformers ``LlamaForSequenceClassification(num_labels=1)`` (the LM body + a scalar head).

Scores are read at each row's last real token ourselves rather than through the model's pooled logits: the
built-in pooling finds "the last non-pad token" by comparing with ``pad_token_id``, which is wrong when the pad
and EOS tokens are the same id (EOS then looks like padding). The same head applied at every position gives the
PPO critic's per-token values.
"""
from __future__ import annotations

from pathlib import Path

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (0 at each row's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (rows may be left- and right-padded)."""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (idx * attention_mask.long()).argmax(-1)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position: [B, T]."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids(attention_mask)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, read at its last real token: [B]."""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def init_reward_model(lm_dir: str | Path):
    """A reward model from a causal LM dir: its body, plus a fresh scalar head. The Auto class picks the LM's
    own family (Llama, or Qwen3 for a model.qk_norm export): Llama's class would drop Qwen3's q/k norms, and
    with the warnings silenced below, without a word."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers reports the fresh head as MISSING: that is the point here
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(lm_dir), num_labels=1)
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
