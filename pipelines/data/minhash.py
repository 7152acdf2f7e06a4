"""MinHash signatures and LSH band keys for a whole batch of documents at once (numpy + pyarrow, no Python
loop over words or shingles).

Why hand-written: Ray Data has no MinHash; datasketch hashes one document at a time in Python (the baseline
in benchmarks/dedup.py). Hashes here are stable across processes (never Python's ``hash()``): words are
hashed with pandas' fixed-key SipHash, permutations are seeded multiply-shift hashes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LITTLE_ENDIAN = np.little_endian
_EMPTY = np.uint32(0xFFFFFFFF)  # signature of a document without words (gets no band keys)


@dataclass(frozen=True)
class MinHasher:
    num_perm: int
    shingle_size: int
    bands: int
    rows: int
    seed: int = 1

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "_a", rng.integers(1, 2**63, self.num_perm, dtype=np.uint64) * 2 + 1)
        object.__setattr__(self, "_b", rng.integers(0, 2**63, self.num_perm, dtype=np.uint64))
        object.__setattr__(self, "_shingle_mult", rng.integers(1, 2**63, self.shingle_size, dtype=np.uint64) | 1)
        object.__setattr__(self, "_band_mult", rng.integers(1, 2**63, self.rows, dtype=np.uint64) | 1)

    def signatures(self, texts: list[str] | pa.Array) -> np.ndarray:
        """(n_docs, num_perm) uint32 MinHash signatures of the word ``shingle_size``-gram sets."""
        word_hashes, offsets = _word_hashes(texts)
        n = len(offsets) - 1
        shingles, owner = _shingle_hashes(word_hashes, offsets, self.shingle_size, self._shingle_mult)
        sig = np.full((n, self.num_perm), _EMPTY, dtype=np.uint32)
        # Chunks of whole documents bound the (shingles x num_perm) matrix to ~32 MB.
        chunk = max(1, (1 << 22) // self.num_perm)
        start = 0
        while start < len(shingles):
            stop = min(len(shingles), start + chunk)
            if stop < len(shingles):  # end the chunk on a document boundary (or split a huge document)
                boundary = np.searchsorted(owner, owner[stop], side="left")
                stop = boundary if boundary > start else stop
            hashed = _permute(shingles[start:stop], self._a, self._b)  # (num_perm, chunk)
            docs = owner[start:stop]
            firsts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            mins = np.minimum.reduceat(hashed, firsts, axis=1)  # along the contiguous axis: fast
            rows = docs[firsts]
            sig[rows] = np.minimum(sig[rows], mins.T)
            start = stop
        return sig

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(n_docs, bands) int64 keys: equal keys in a band mean equal ``rows`` signature values there."""
        banded = sig[:, : self.bands * self.rows].reshape(len(sig), self.bands, self.rows).astype(np.uint64)
        keys = (banded * self._band_mult).sum(axis=2, dtype=np.uint64)
        keys ^= np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # band in the key
        return _mix64(keys).view(np.int64)


def _word_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """Lower-cased \\w+ words of every text, hashed: (flat uint64 hashes, per-text offsets)."""
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, type=pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    tokens = pc.split_pattern_regex(pc.utf8_lower(arr.fill_null("")), r"\W+")
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    flat = tokens.values
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)  # split leaves "" at the edges
    # Hash each distinct word once, then gather: a corpus has far fewer distinct words than words.
    encoded = pc.dictionary_encode(flat)
    vocab = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    vocab_hash = pd.util.hash_array(vocab, categorize=False) if len(vocab) else np.zeros(0, np.uint64)
    hashes = vocab_hash[encoded.indices.to_numpy()] if len(flat) else np.zeros(0, np.uint64)
    counts = np.add.reduceat(keep.astype(np.int64), offsets[:-1]) if len(flat) else np.zeros(len(offsets) - 1)
    counts = np.where(np.diff(offsets) > 0, counts, 0)
    new_offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    return hashes[keep], new_offsets


def _shingle_hashes(words: np.ndarray, offsets: np.ndarray, k: int, mult: np.ndarray):
    """Hashes of every k-word window inside a document (a shorter document is one shingle of all its
    words): (uint64 hashes, owning document index), ordered by document."""
    n_docs = len(offsets) - 1
    lengths = np.diff(offsets)
    owner_of_word = np.repeat(np.arange(n_docs), lengths)
    total = len(words)
    acc = np.zeros(total, dtype=np.uint64)
    pos = np.arange(total)
    for j in range(k):
        idx = pos + j
        inside = idx < total
        shifted = np.zeros(total, dtype=np.uint64)
        shifted[inside] = words[idx[inside]]
        # only words of the same document take part (shorter docs: the window is cut at the doc end)
        same = np.zeros(total, dtype=bool)
        same[inside] = owner_of_word[idx[inside]] == owner_of_word[inside]
        acc += np.where(same, shifted * mult[j], np.uint64(0))
    ends = offsets[1:][owner_of_word] if total else np.zeros(0, np.int64)
    starts = offsets[:-1][owner_of_word] if total else np.zeros(0, np.int64)
    full_window = pos + k <= ends
    short_doc_first = (lengths[owner_of_word] < k) & (pos == starts) if total else np.zeros(0, bool)
    valid = full_window | short_doc_first
    return _mix64(acc[valid]), owner_of_word[valid]


def _permute(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm, n) multiply-shift hashes of the shingles: the high 32 bits of (a*x + b) mod 2^64.

    Computed in place and read as a uint32 view of the high halves (little-endian): no shift, no copy."""
    with np.errstate(over="ignore"):
        h = np.multiply(a[:, None], shingles[None, :])
        h += b[:, None]
    return h.view(np.uint32)[:, 1::2] if _LITTLE_ENDIAN else (h >> np.uint64(32)).astype(np.uint32)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads the bits of a linear combination over the whole word."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots, row by row (an unbiased estimate of the Jaccard similarity)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def shingle_set(text: str, k: int) -> set[tuple[str, ...]]:
    """Reference shingling (for tests and the benchmark's ground truth): same words as the fast path."""
    import re

    ws = re.findall(r"\w+", text.lower())
    if len(ws) < k:
        return {tuple(ws)} if ws else set()
    return {tuple(ws[i:i + k]) for i in range(len(ws) - k + 1)}
