"""Bits per byte and greedy samples for one Hugging Face causal LM.

Bits per byte = (sum over the text's tokens of -ln p(token | context)) / ln 2 / (UTF-8 bytes of the text). The
byte count does not depend on the tokenizer, so models with different vocabularies compare (a tokenizer that
packs more bytes per token has a larger per-token loss, not a better bpb).

Each document is scored after one end-of-text token (EOS, else BOS): pretraining packs ``doc + EOS`` back to back,
so EOS is the context a document start is learned after. A document longer than the window is cut into
non-overlapping windows of ``seq_len`` tokens (the model's training length), each scored from its own start,
as pretraining's validation loss is; so the first tokens of each window see less context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    inputs: list[int]
    targets: list[int]


def windows(ids: list[int], start_id: int, seq_len: int) -> list[Window]:
    """``[start_id] + ids`` as (inputs, next-token targets) windows of at most ``seq_len`` tokens."""
    tokens = [start_id, *ids]
    return [Window(tokens[i:i + seq_len], tokens[i + 1:i + 1 + seq_len])
            for i in range(0, len(tokens) - 1, seq_len)]


def context_token(tokenizer, where: str) -> int:
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(f"{where}: the tokenizer has neither an EOS nor a BOS token to start a document with")


@torch.no_grad()
def sum_nll(model, batch: list[Window], pad_id: int, device: torch.device) -> float:
    """Sum of the targets' negative log-likelihoods (nats) over a batch of right-padded windows."""
    width = max(len(w.inputs) for w in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, w in enumerate(batch):
        inputs[row, :len(w.inputs)] = torch.tensor(w.inputs)
        labels[row, :len(w.targets)] = torch.tensor(w.targets)
        mask[row, :len(w.inputs)] = 1
    logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.to(device), ignore_index=-100,
                                            reduction="none")
    return float(nll.double().sum())


def bits_per_byte(model, tokenizer, texts: list[str], seq_len: int, batch_size: int, where: str) -> dict:
    device = next(model.parameters()).device
    start = context_token(tokenizer, where)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    todo = [w for ids in encoded for w in windows(ids, start, seq_len)]
    nll = sum(sum_nll(model, todo[i:i + batch_size], pad, device) for i in range(0, len(todo), batch_size))
    tokens = sum(len(ids) for ids in encoded)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    # Rounded so that a rerun on another thread count (float sums in another order) records the same numbers.
    return {"bits_per_byte": round(nll / math.log(2) / n_bytes, 5), "nll_nats": round(nll, 2), "tokens": tokens,
            "bytes": n_bytes, "loss": round(nll / tokens, 5), "tokens_per_byte": round(tokens / n_bytes, 5),
            "seq_len": seq_len}


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int) -> list[dict]:
    """One greedy completion per prompt, generated one at a time (no padding: the numbers don't depend on
    which prompts share a batch). ``chat``: the prompt goes through the tokenizer's chat template."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([ids], device=device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generated = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad)[0, len(ids):]
        out.append({"prompt": prompt, "completion": tokenizer.decode(generated, skip_special_tokens=True),
                    "tokens": len(generated)})
    return out
