"""Reward-model data: preference pairs, as ``prompt``/``chosen``/``rejected`` records or as full-transcript
``chosen``/``rejected`` pairs in the Anthropic HH format (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), whose
shared prefix becomes the prompt. JSONL, JSONL.gz, JSON or parquet (see ``pipelines.chat.records.iter_records``).

Every pair becomes (prompt messages, chosen reply, rejected reply) and is rendered with the chat template, the
same way PPO's rollouts are (prompt + assistant reply + EOS), so the reward model scores what it will see.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.chat.records import iter_records

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...): hashable
    chosen: str
    rejected: str

    def messages(self, reply: str) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.prompt] + [{"role": "assistant", "content": reply}]

    def key(self) -> str:
        return repr((self.prompt, self.chosen, self.rejected))


def parse_hh_turns(text: str, where: str) -> tuple[tuple[str, str], ...]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> (("user", "a"), ("assistant", "b"), ...)."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: chosen: not an HH transcript (must start with '\\n\\nHuman:')")
    role = {"Human": "user", "Assistant": "assistant"}
    return tuple((role[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2))


def split_hh(chosen: str, rejected: str, where: str) -> PreferencePair:
    """The shared prefix up to its last ``\\n\\nAssistant:`` is the prompt; the rest are the two replies."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"{where}: chosen/rejected: no shared prefix ending in an '\\n\\nAssistant:' turn "
                         "(HH pairs must differ only in the last assistant reply)")
    prompt = parse_hh_turns(chosen[:cut], where)
    if prompt[-1][0] != "user":
        raise ValueError(f"{where}: chosen: the prompt must end with a Human turn")
    return PreferencePair(prompt, chosen[cut + len(ASSISTANT):].strip(), rejected[cut + len(ASSISTANT):].strip())


def to_pair(record: dict, where: str) -> PreferencePair:
    for name in ("chosen", "rejected"):
        if not isinstance(record.get(name), str):
            raise ValueError(f"{where}: {name}: needs a string (found keys: {sorted(record)})")  # noqa: TRY004
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: prompt: must be a string")
        return PreferencePair((("user", record["prompt"]),), record["chosen"], record["rejected"])
    return split_hh(record["chosen"], record["rejected"], where)


def read_pairs(path: str | Path) -> list[PreferencePair]:
    pairs = [to_pair(record, where) for where, record in iter_records(path)]
    if not pairs:
        raise ValueError(f"reward.data: {path} holds no records")
    return pairs


def encode_reply(tokenizer, pair: PreferencePair, reply: str, max_len: int) -> list[int]:
    """Chat-rendered prompt + reply + EOS; over ``max_len``, the start is cut (the score is read at the end)."""
    ids = tokenizer.apply_chat_template(pair.messages(reply), tokenize=True, return_dict=True)["input_ids"]
    return list(ids)[-max_len:]


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_len: int) -> list[tuple[list[int], list[int]]]:
    return [(encode_reply(tokenizer, p, p.chosen, max_len), encode_reply(tokenizer, p, p.rejected, max_len))
            for p in pairs]
