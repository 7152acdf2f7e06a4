"""The DPO ``TrainTask`` pieces for the shared engine (module-level, bound with ``functools.partial``)."""
from __future__ import annotations

import torch

from actors import algos
from actors.ppo.rollout import response_logprobs


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(reply | prompt) per row: the reply's token log-probs summed ([2B])."""
    logprobs, _ = response_logprobs(model, batch)
    return algos.masked_sum(logprobs, batch["response_mask"].to(logprobs.dtype), dim=-1)


def dpo_step_loss(engine, batch: dict[str, torch.Tensor], *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0):
    logps, ref = sequence_logps(engine, batch), batch["ref_logps"]
    half = logps.shape[0] // 2
    return algos.dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta, loss_type=loss_type,
                          label_smoothing=label_smoothing)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())
