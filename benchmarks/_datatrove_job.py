"""Runs INSIDE the datatrove venv (see benchmarks/datatrove_minhash.py), never in the project venv.

    python _datatrove_job.py WORK --tasks 2 --workers 2 --n-grams 5 --buckets 16 --rows 8 --seed 1

Reads WORK/input/{rank:05d}.jsonl (one file per task, so task r reads exactly file r), runs datatrove's four
MinHash stages with LocalPipelineExecutor and writes WORK/result.json: ``{"seconds": wall seconds of the 4
stages, "stage_seconds": [one per stage], "removed": [[removed_id, kept_id], ...], "version": ...}``.
"""
from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer


class SplitTokenizer(WordTokenizer):
    """Words = str.split() of datatrove's simplified text (punctuation already turned into spaces): closer
    to our ``\\w+`` than spaCy's English rules and much cheaper (datatrove's WhitespaceTokenizer is spaCy
    "xx" underneath)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:  # unused by MinHash
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:  # unused by MinHash
        return [(0, len(text))]


def run_stages(work: Path, config: MinhashConfig, tasks: int, workers: int,
               language: str | WordTokenizer) -> list[float]:
    inp, logs, sigs = str(work / "input"), work / "logs", str(work / "sigs")

    def executor(pipeline, n_tasks: int, name: str) -> LocalPipelineExecutor:
        # skip_completed=False: a fresh work dir anyway, and we never want a silently skipped (untimed) stage
        return LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                                     logging_dir=str(logs / name), skip_completed=False)

    stages = [
        executor([JsonlReader(inp), MinhashDedupSignature(sigs, config=config, language=language)], tasks,
                 "1-sigs"),
        # datatrove needs a multiple of num_buckets tasks here (each task owns one bucket / hash range)
        executor([MinhashDedupBuckets(sigs, str(work / "buckets"), config=config)],
                 config.num_buckets, "2-buckets"),
        # clustering is a single union-find task by design (asserts world_size == 1)
        executor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config,
                                      save_cluster_id=True)], 1, "3-cluster"),
        executor([JsonlReader(inp),
                  MinhashDedupFilter(str(work / "remove"),  # dropped docs go to removed/, to cross-check
                                     exclusion_writer=JsonlWriter(str(work / "removed"), "${rank}.jsonl",
                                                                  None)),
                  JsonlWriter(str(work / "kept"), "${rank}.jsonl", None)], tasks, "4-filter"),
    ]
    seconds = []
    for stage in stages:
        start = time.perf_counter()
        stage.run()
        seconds.append(time.perf_counter() - start)
    return seconds


def removed_pairs(work: Path, tasks: int) -> list[list[str]]:
    """(removed id, kept id) from stage 3's binary output. Per task r (= sig file stem r):
    ``{r:06d}.remove`` holds uint32 LE indices of removed docs in task r's input order, and
    ``{r:06d}.clusters`` holds (uint32 doc index, uint32 cluster id) for every doc in any cluster.
    Each cluster's one doc that is not in a .remove file is the doc datatrove keeps."""
    members: dict[int, list[str]] = {}
    removed: set[str] = set()
    for rank in range(tasks):
        with open(work / "input" / f"{rank:05d}.jsonl", encoding="utf-8") as f:
            # stage 1's doc index counts the docs the reader yields, and it skips those with empty text
            ids = [doc["id"] for doc in map(json.loads, f) if doc["text"]]
        base = work / "remove" / f"{rank:06d}"
        if Path(f"{base}.clusters").exists():
            for doc, cluster in np.fromfile(f"{base}.clusters", dtype="<u4").reshape(-1, 2).tolist():
                members.setdefault(cluster, []).append(ids[doc])
        if Path(f"{base}.remove").exists():
            removed.update(ids[i] for i in np.fromfile(f"{base}.remove", dtype="<u4").tolist())
    pairs = []
    for docs in members.values():
        kept = [d for d in docs if d not in removed]
        assert len(kept) == 1, f"a cluster must keep exactly one doc, got {kept}"
        pairs.extend([d, kept[0]] for d in docs if d in removed)
    # cross-check the index -> id mapping against what stage 4 actually dropped
    dropped = {json.loads(line)["id"] for p in (work / "removed").glob("*.jsonl")
               for line in p.read_text(encoding="utf-8").splitlines()}
    assert dropped == removed, f"stage 4 dropped {len(dropped)} docs, the cluster files say {len(removed)}"
    return pairs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-grams", type=int, default=5)
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tokenizer", choices=("spacy", "split"), default="spacy")
    a = p.parse_args()
    # datatrove's default text norm and 64-bit xxhash
    config = MinhashConfig(n_grams=a.n_grams, num_buckets=a.buckets, hashes_per_bucket=a.rows, seed=a.seed,
                           hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    language = "eng" if a.tokenizer == "spacy" else SplitTokenizer()  # "eng": datatrove's spaCy blank "en"
    stages = run_stages(a.work, config, a.tasks, a.workers, language)
    result = {"seconds": sum(stages), "stage_seconds": stages, "removed": removed_pairs(a.work, a.tasks),
              "version": version("datatrove")}
    (a.work / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":  # required: LocalPipelineExecutor starts its pool with forkserver
    main()
