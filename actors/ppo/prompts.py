"""PPO prompts: a file of ``prompt`` strings or ``messages`` chats (JSONL/JSONL.gz/JSON/parquet), or by default
the built-in questions held out from SFT and reward training (so PPO optimises on questions not memorised)."""
from __future__ import annotations

from pathlib import Path

from pipelines.chat.builtin_qa import builtin_pairs, split_pairs
from pipelines.chat.records import ROLES, iter_records


def read_prompt_chats(path: str | Path) -> list[list[dict[str, str]]]:
    chats = []
    for where, record in iter_records(path):
        if isinstance(record.get("prompt"), str):
            chats.append([{"role": "user", "content": record["prompt"]}])
        elif isinstance(record.get("messages"), list) and record["messages"]:
            msgs = record["messages"]
            if any(not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str)
                   for m in msgs):
                raise ValueError(f"{where}: messages: each needs role in {list(ROLES)} and a string content")
            if msgs[-1]["role"] != "user":
                raise ValueError(f"{where}: messages: a prompt must end with a user turn")
            chats.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        else:
            raise ValueError(f"{where}: needs a `prompt` string or a `messages` list (found: {sorted(record)})")
    if not chats:
        raise ValueError(f"ppo.prompts: {path} holds no records")
    return chats


def builtin_prompt_chats(val_fraction: float) -> list[list[dict[str, str]]]:
    _, held_out = split_pairs(builtin_pairs(), val_fraction)
    return [[{"role": "user", "content": p.question}] for p in held_out]


def encode_prompts(tokenizer, chats: list[list[dict[str, str]]], max_prompt_len: int) -> list[list[int]]:
    """Chat-rendered prompts ending in the assistant header; over ``max_prompt_len``, the start is cut."""
    out = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        out.append(list(ids)[-max_prompt_len:])
    return out
