"""DPO data: preference pairs (``pipelines.reward.data``: prompt/chosen/rejected or HH transcripts) as token ids
split at the reply, and the batches the reference actors and the policy score.

A pair is ``(prompt, chosen, rejected)``: the chat-rendered prompt ending in the assistant header (what PPO's
policy generates from) and each reply's tokens up to and including EOS. A batch of B pairs is laid out like a
PPO rollout batch (``actors.ppo.rollout``): 2B rows, the B chosen replies then the B rejected ones, prompts
left-padded and replies right-padded, so one forward scores both and ``response_logprobs`` applies unchanged.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from cluster.config import atomic_write_json
from pipelines.chat.splits import rank_order
from pipelines.reward.data import PreferencePair

EncodedPair = tuple[list[int], list[int], list[int]]  # prompt, chosen reply, rejected reply


def encode_pair(tokenizer, pair: PreferencePair, max_len: int, max_prompt_len: int) -> EncodedPair:
    """Prompt ids keep their last ``max_prompt_len`` tokens; replies are cut to fit ``max_len`` in all."""
    messages = [{"role": role, "content": content} for role, content in pair.prompt]
    prompt = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
    replies = []
    for reply in (pair.chosen, pair.rejected):
        full = list(tokenizer.apply_chat_template(pair.messages(reply), tokenize=True,
                                                  return_dict=True)["input_ids"])
        if full[:len(prompt)] != prompt:
            # The reply's tokens are found by cutting the rendered prompt off the rendered chat.
            raise ValueError("dpo: the tokenizer's chat template renders a prompt differently once a reply "
                             "follows it; DPO needs the prompt as a prefix of prompt + reply")
        replies.append(full[len(prompt):])
    prompt = prompt[-max_prompt_len:]
    room = max_len - len(prompt)
    return prompt, replies[0][:room], replies[1][:room]


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_len: int, max_prompt_len: int) -> list[EncodedPair]:
    return [encode_pair(tokenizer, p, max_len, max_prompt_len) for p in pairs]


def preference_batch(rows: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows (chosen replies first): ``sequences``, ``attention_mask``, ``response_mask`` as in a rollout."""
    prompts = [torch.tensor(r[0], dtype=torch.long) for r in rows] * 2
    replies = [torch.tensor(r[1], dtype=torch.long) for r in rows] + [torch.tensor(r[2], dtype=torch.long)
                                                                      for r in rows]
    ones = lambda ts: [torch.ones(len(t), dtype=torch.long) for t in ts]
    prompt_ids = pad_sequence(prompts, batch_first=True, padding_value=pad_id, padding_side="left")
    prompt_mask = pad_sequence(ones(prompts), batch_first=True, padding_value=0, padding_side="left")
    reply_ids = pad_sequence(replies, batch_first=True, padding_value=pad_id)
    reply_mask = pad_sequence(ones(replies), batch_first=True, padding_value=0)
    return {"sequences": torch.cat([prompt_ids, reply_ids], 1), "attention_mask": torch.cat([prompt_mask, reply_mask], 1),
            "response_mask": reply_mask}


def save_rows(data_dir: Path, split: str, rows: list[EncodedPair], ref_logps: list[tuple[float, float]]) -> Path:
    """``<data_dir>/<split>.json``: each pair with its reference log-probs (chosen, rejected), computed once."""
    path = Path(data_dir) / f"{split}.json"
    atomic_write_json(path, [[*row, *ref] for row, ref in zip(rows, ref_logps)])
    return path


@functools.lru_cache(maxsize=4)
def load_rows(data_dir: str, split: str) -> list[list]:
    return json.loads((Path(data_dir) / f"{split}.json").read_text())


def dpo_batches(split: str, rank: int, world_size: int, epoch: int, *, data_dir: str, micro_batch_size: int,
                pad_id: int, seed: int):
    """A preference batch per ``micro_batch_size`` pairs of this rank, with ``ref_logps`` [2B] beside it."""
    rows = load_rows(data_dir, split)
    order = rank_order(len(rows), split, rank, world_size, epoch, seed)
    for start in range(0, len(order) - micro_batch_size + 1, micro_batch_size):  # full micro-batches only
        part = [rows[i] for i in order[start:start + micro_batch_size]]
        batch = preference_batch([(r[0], r[1], r[2]) for r in part], pad_id)
        batch["ref_logps"] = torch.tensor([r[3] for r in part] + [r[4] for r in part], dtype=torch.float32)
        yield batch
