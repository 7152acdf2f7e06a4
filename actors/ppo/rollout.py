"""Rollout tensors: left-padded prompts, sampled responses, and per-token log-probs / values over them.

A rollout batch is a dict of tensors. ``sequences`` is ``[B, P + R]``: prompts left-padded to P, responses
right-padded to R. ``response_mask`` ``[B, R]`` is 1 on response tokens up to and including the first EOS. Per-token
quantities (``logprobs``, ``values``, ``advantages`` ...) are ``[B, R]``, aligned with the response tokens.
"""
from __future__ import annotations

import inspect

import torch
from torch.nn.utils.rnn import pad_sequence

from actors.algos import entropy_from_logits, logprobs_from_logits
from actors.ppo import decode
from pipelines.reward.model import position_ids, token_values

# Keys whose dim 1 is a response/sequence length (padded when batches of different R are concatenated).
PAD_VALUES = {"sequences": "pad", "attention_mask": 0, "response_mask": 0}


def pad_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ``[B, P]`` ids and attention mask (prompts end where responses begin)."""
    rows = [torch.tensor(p, dtype=torch.long) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return ids, mask


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS (all of them if there is none)."""
    is_eos = (responses == eos_id).long()
    eos_seen_before = is_eos.cumsum(-1) - is_eos
    return (eos_seen_before == 0).long()


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, pad_id: int, eos_id: int,
             max_new_tokens: int, temperature: float, top_p: float, stop_at_eos: bool = True,
             with_logprobs: bool = False, step=None) -> dict[str, torch.Tensor]:
    """Sample one response per prompt (``actors.ppo.decode``: KV cache, transformers' warpers). Without
    ``stop_at_eos`` EOS is suppressed until ``max_new_tokens`` (fixed-length responses, for like-for-like
    benchmarks). ``with_logprobs``: also the sampled tokens' log-probs under ``model`` (the behaviour policy's),
    kept from the sampling steps rather than computed by another forward. ``step``: see ``decode.sample``."""
    was_training = model.training
    model.eval()
    responses, logprobs = decode.sample(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                        eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_p=top_p,
                                        stop_at_eos=stop_at_eos, step=step)
    model.train(was_training)
    resp_mask = response_mask(responses, eos_id)
    responses = responses.masked_fill(resp_mask == 0, pad_id)
    out = {"sequences": torch.cat([prompt_ids, responses], 1),
           "attention_mask": torch.cat([prompt_mask, resp_mask], 1),
           "response_mask": resp_mask}
    if with_logprobs:
        out["logprobs"] = logprobs * resp_mask
    return out


def _keeps_logits(model) -> bool:
    """Whether the causal LM (or the one a DeepSpeed engine wraps) takes ``logits_to_keep``."""
    forward = getattr(model, "module", model).forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(response token | prefix) under ``model`` ([B, R]); with the per-token entropy if asked."""
    seq, mask = batch["sequences"], batch["attention_mask"]
    r = batch["response_mask"].shape[1]
    # Only the last r + 1 positions' logits (transformers' ``logits_to_keep``): the LM head and log-softmax
    # over the prompt positions would be thrown away (large vocabularies, long prompts; same values, tested).
    keep = {"logits_to_keep": r + 1} if _keeps_logits(model) else {}
    logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                   **keep).logits
    logits = logits[:, -r - 1:-1] / temperature  # position t predicts token t + 1
    logprobs = logprobs_from_logits(logits, seq[:, -r:])
    return logprobs, (entropy_from_logits(logits) if with_entropy else None)


def response_values(value_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """V(prefix before each response token) from a scalar-head model ([B, R])."""
    r = batch["response_mask"].shape[1]
    values = token_values(value_model, batch["sequences"], batch["attention_mask"])
    return values[:, -r - 1:-1]


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` row shards of (nearly) equal size, in order."""
    rows = next(iter(batch.values())).shape[0]
    bounds = [rows * i // n for i in range(n + 1)]
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in batch.items()} for i in range(n)]


def concat_batches(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate row shards, right-padding length dims to the longest (shards may stop generating early)."""
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2:
            width = max(t.shape[1] for t in tensors)
            fill = PAD_VALUES.get(key, 0)
            fill = pad_id if fill == "pad" else fill
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors]
        out[key] = torch.cat(tensors, 0)
    return out


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]
