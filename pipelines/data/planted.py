"""A generated corpus with planted duplicates, for the data pipeline tests and benchmarks/dedup.py.

Base documents are random "words" (so no two share shingles by chance); then:
- exact copies (some differing only in case, spacing or punctuation),
- near copies: a few words changed and a header line added (Jaccard of 5-word shingles ~0.85-0.9),
- a near copy of a near copy (a chain: one cluster of three),
- hard negatives: a base document's first third followed by new words (Jaccard ~0.2).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PlantedCorpus:
    docs: list[dict]                                          # {"id", "text"}
    clusters: list[set[str]] = field(default_factory=list)    # ids that are duplicates of each other
    hard_negatives: list[str] = field(default_factory=list)   # ids that must be kept

    def write_jsonl(self, path: Path, files: int = 2) -> list[Path]:
        path.mkdir(parents=True, exist_ok=True)
        out = [path / f"part-{i}.jsonl" for i in range(files)]
        handles = [p.open("w", encoding="utf-8") for p in out]
        for i, doc in enumerate(self.docs):
            handles[i % files].write(json.dumps(doc) + "\n")
        for h in handles:
            h.close()
        return out


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(3, 8)))


def _mutate(rng: random.Random, words: list[str], changes: int, header: bool) -> list[str]:
    words = list(words)
    for i in rng.sample(range(len(words)), changes):
        words[i] = _word(rng)
    if header:
        words = ["Posted", "by", "the", "site", "admin"] + words
    return words


def planted_corpus(n_base: int = 60, words: int = 300, seed: int = 0) -> PlantedCorpus:
    rng = random.Random(seed)
    vocab = [_word(rng) for _ in range(20000)]
    base = [[rng.choice(vocab) for _ in range(words)] for _ in range(n_base)]

    def sentence_case(ws: list[str]) -> str:  # some punctuation and lines: realistic enough for the filters
        lines = [" ".join(ws[i:i + 15]) + "." for i in range(0, len(ws), 15)]
        return "\n".join(line[0].upper() + line[1:] for line in lines)

    corpus = PlantedCorpus(docs=[{"id": f"base-{i:04d}", "text": sentence_case(ws)} for i, ws in enumerate(base)])
    k = max(1, n_base // 6)
    for j in range(k):  # exact copies; every other one with only case/spacing changed
        src = corpus.docs[j]
        text = src["text"] if j % 2 else src["text"].upper().replace(" ", "  ")
        corpus.docs.append({"id": f"exact-{j:04d}", "text": text})
        corpus.clusters.append({src["id"], f"exact-{j:04d}"})
    for j in range(k, 2 * k):  # near copies: 3 words changed + a header
        near = _mutate(rng, base[j], 3, header=True)
        corpus.docs.append({"id": f"near-{j:04d}", "text": sentence_case(near)})
        cluster = {f"base-{j:04d}", f"near-{j:04d}"}
        if j == k:  # a chain: a near copy of the near copy
            corpus.docs.append({"id": f"near2-{j:04d}", "text": sentence_case(_mutate(rng, near, 2, False))})
            cluster.add(f"near2-{j:04d}")
        corpus.clusters.append(cluster)
    for j in range(2 * k, 3 * k):  # hard negatives: a third shared, the rest new
        third = words // 3
        words_neg = base[j][:third] + [rng.choice(vocab) for _ in range(words - third)]
        corpus.docs.append({"id": f"hardneg-{j:04d}", "text": sentence_case(words_neg)})
        corpus.hard_negatives.append(f"hardneg-{j:04d}")
    rng.shuffle(corpus.docs)
    return corpus
