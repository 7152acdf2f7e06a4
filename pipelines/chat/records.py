"""Chat records: read them (JSONL, JSONL.gz, JSON or parquet), render them with the tokenizer's chat template,
and keep the loss on assistant tokens only (``{% generation %}`` marks them and transformers returns the mask; a
template without the tags, as most models' own are, gets the mask from the text spans of its assistant turns).

Record shapes: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`` or
``{"prompt": ..., "response": ...}``. A bad record raises ``ValueError`` naming the file, line and field.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

IGNORE = -100  # label of tokens without loss (transformers' CrossEntropy ignore_index)
ROLES = ("system", "user", "assistant")
T = TypeVar("T")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a .jsonl / .jsonl.gz / .json / .parquet file; ``where`` is file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {i}", row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if path.suffix == ".json":
            data = json.load(fh)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json data file must hold a list of records")
            for i, row in enumerate(data, 1):
                yield f"{path}:record {i}", row
            return
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: each line must be a JSON object")  # noqa: TRY004 (bad data)
            yield f"{path}:{i}", row


def to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A record as a validated chat (list of role/content dicts) ending with at least one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: messages: must be a non-empty list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{j}]: needs role in {list(ROLES)} and a string content")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            raise ValueError(f"{where}: prompt/response: must be strings")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError(f"{where}: needs a `messages` list or `prompt` and `response` fields "
                         f"(found: {sorted(record)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: messages: no assistant turn to learn from")
    return messages


def read_chats(path: str | Path) -> list[list[dict[str, str]]]:
    return [to_messages(record, where) for where, record in iter_records(path)]


def has_generation_tags(template: str | None) -> bool:
    return bool(template and _GENERATION_TAG.search(template))


def assistant_mask_from_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) for a chat template without ``{% generation %}`` tags (most models' own).

    An assistant turn is the text its template adds after the generation prompt of the turns before it (its
    content and end-of-turn marker); tokens whose text starts inside such a span are learned. Needs a fast
    tokenizer (character offsets) and a template that renders earlier turns the same in every prefix.
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__}: the chat template has no {{% generation %}} tags and the "
                         "tokenizer is not a fast one, so the assistant tokens cannot be located")

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text, spans = render(messages, False), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[:i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template renders earlier turns differently as the chat grows; add "
                             "{% generation %} tags to it to mark the assistant tokens")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= lo < b for a, b in spans)) for lo, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_chat(tokenizer, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels = IGNORE outside assistant replies; truncated to ``max_len``.

    None when truncation leaves no assistant token (nothing to learn from the example).
    """
    if has_generation_tags(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = assistant_mask_from_spans(tokenizer, messages)
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        return None
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples into rows of exactly ``max_len`` tokens (the last row may be shorter).

    Attention is not reset at example boundaries (no varlen attention on CPU); every example starts with BOS
    from the chat template, which is what the model sees as a document start in pretraining too.
    """
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex_ids, ex_labels in examples:
        ids += ex_ids
        labels += ex_labels
        while len(ids) >= max_len:
            rows.append((ids[:max_len], labels[:max_len]))
            ids, labels = ids[max_len:], labels[max_len:]
    if ids and any(label != IGNORE for label in labels):
        rows.append((ids, labels))
    return rows


def hash_split(items: list[T], key: Callable[[T], str], fraction: float, min_held: int = 1
               ) -> tuple[list[T], list[T]]:
    """(kept, held-out): the ``round(len * fraction)`` items (at least ``min_held``) with the smallest stable
    hash of ``key(item)`` are held out; the order of the file does not matter, and the count is exact."""
    ranked = sorted(range(len(items)), key=lambda i: (zlib.crc32(key(items[i]).encode()), i))
    n_held = min(len(items) - 1, max(min_held, round(len(items) * fraction)))
    held = set(ranked[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
