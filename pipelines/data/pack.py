"""Tokenize, append EOS, pack into fixed-length rows recording where documents start, split train/validation.

Packing is per group of about ``tokenize.batch_docs`` documents (a Ray Data map has no state across groups): each
group drops its last partial row, at most ``seq_len - 1`` tokens per group (counted in stats.json). A document's
group is a stable hash of its id and a group is packed in (id, text) order, so the same documents give the same
shards byte for byte on every run, whatever order Ray Data's blocks arrive in.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import pyarrow as pa

from cluster.storage import location

SPLITS = ("train", "validation")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable per-document split: the same document lands in the same split on every run and worker."""
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return bucket / 2**64 < val_fraction


def pack_group(doc_id: str, groups: int) -> int:
    """Stable per-document pack group in [0, groups) (independent of the split's hash by its own salt)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, salt=b"pack").digest()
    return int.from_bytes(digest, "big") % groups


def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, list[list[int]], int]:
    """Concatenate ``doc + [EOS]`` for every doc and cut rows of ``seq_len``.

    Returns (rows int32 (n, seq_len), doc_starts per row (offsets where a document begins in that row),
    tokens dropped at the end)."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    total = int(lengths.sum())
    n_rows = total // seq_len
    flat = np.empty(total, dtype=np.int32)
    pos = 0
    for doc in docs:
        flat[pos:pos + len(doc)] = doc
        flat[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    starts = np.r_[0, np.cumsum(lengths)[:-1]] if len(docs) else np.zeros(0, np.int64)
    kept = n_rows * seq_len
    starts = starts[starts < kept]
    row_of_start = starts // seq_len
    boundaries = np.searchsorted(row_of_start, np.arange(n_rows + 1), side="left")
    doc_starts = [(starts[boundaries[r]:boundaries[r + 1]] - r * seq_len).astype(np.int32).tolist()
                  for r in range(n_rows)]
    return flat[:kept].reshape(n_rows, seq_len), doc_starts, total - kept


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_file: str):
    # The raw `tokenizers` object: encode_batch in Rust, no Python-side wrapper per document. Same ids as the
    # HF wrapper (pipelines.tokenizer adds no special tokens on encode).
    from tokenizers import Tokenizer
    return Tokenizer.from_str(location(tokenizer_file).read_text(encoding="utf-8"))


def tokenize_pack_batch(batch: pa.Table, tokenizer_file: str, eos_id: int, seq_len: int,
                        val_fraction: float) -> pa.Table:
    """Ray Data UDF: documents (id, text) -> packed rows (split, input_ids, doc_starts, dropped_tokens)."""
    tok = _tokenizer(tokenizer_file)
    ids = batch.column("id").to_pylist()
    encoded = tok.encode_batch(batch.column("text").to_pylist(), add_special_tokens=False)
    out = {"split": [], "input_ids": [], "doc_starts": [], "dropped_tokens": []}
    for split in SPLITS:
        want_val = split == "validation"
        docs = [e.ids for i, e in zip(ids, encoded) if is_validation(i, val_fraction) == want_val]
        rows, starts, dropped = pack(docs, eos_id, seq_len)
        out["split"] += [split] * len(rows)
        out["input_ids"] += list(rows)
        out["doc_starts"] += starts
        # dropped tokens of this batch ride on its first row (a batch with no row loses < seq_len tokens)
        out["dropped_tokens"] += [dropped if i == 0 else 0 for i in range(len(rows))]
    return pa.table({
        "split": pa.array(out["split"], type=pa.string()),
        "input_ids": pa.array([r.tolist() for r in out["input_ids"]], type=pa.list_(pa.int32())),
        "doc_starts": pa.array(out["doc_starts"], type=pa.list_(pa.int32())),
        "dropped_tokens": pa.array(out["dropped_tokens"], type=pa.int64()),
    })


def unigram_entropy_nats(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
