"""Near-dedup benchmark: docs/s and precision/recall on planted duplicates, same corpus, same run.

    .venv/bin/python benchmarks/dedup.py [--docs 20000] [--words 200] [--num-cpus 2] [--no-datatrove]

Compared (all with 128 permutations, 5-word shingles of lower-cased \\w+ words, NearDedupConfig's Jaccard
threshold 0.75):
- baseline ``datasketch``: MinHash per document + MinHashLSH(threshold=0.75) insert/query, then clusters;
- ``raylm-local``: pipelines/data/dedup_local.py (numpy MinHash, one process);
- ``raylm-ray``: pipelines/data/dedup.py on a local Ray cluster (the ``raylm data`` code path), warm;
- ``datatrove`` 0.10.1: its 4 on-disk MinHash stages with 2 local workers, in its own venv
  (benchmarks/datatrove_minhash.py: built once under ~/.cache/raylm; what differs from ours is listed there);
  its stage time only, as spaCy (shipped) and with a str.split() tokenizer.
Precision/recall are over duplicate pairs: pairs of documents put in one cluster vs planted clusters.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.schemas.data import NearDedupConfig
from pipelines.data.components import duplicate_keepers
from pipelines.data.planted import planted_corpus

WORD = re.compile(r"\w+")


def pairs_of(clusters) -> set[tuple[str, str]]:
    out = set()
    for members in clusters:
        out.update(itertools.combinations(sorted(members), 2))
    return out


def clusters_from_keepers(keepers) -> list[set[str]]:
    groups: dict[str, set[str]] = {}
    for doc_id, keeper in zip(keepers["id"], keepers["keeper"]):
        groups.setdefault(keeper, set()).add(doc_id)
    return list(groups.values())


def precision_recall(predicted: set, truth: set) -> tuple[float, float]:
    hit = len(predicted & truth)
    return (hit / len(predicted) if predicted else 1.0), (hit / len(truth) if truth else 1.0)


def run_datasketch(ids, texts, cfg: NearDedupConfig):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    left, right = [], []
    for doc_id, text in zip(ids, texts):
        words = WORD.findall(text.lower())
        k = cfg.shingle_size
        shingles = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
        mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        mh.update_batch([s.encode("utf-8") for s in shingles])
        for other in lsh.query(mh):
            left.append(doc_id)
            right.append(other)
        lsh.insert(doc_id, mh)
    return duplicate_keepers(np.array(left, dtype=object), np.array(right, dtype=object))


def run_local(ids, texts, cfg):
    from pipelines.data.dedup_local import near_duplicates_local
    return near_duplicates_local(ids, texts, cfg)


def ray_dataset(ids, texts, num_blocks: int):
    import ray
    return ray.data.from_items([{"id": i, "text": t} for i, t in zip(ids, texts)],
                               override_num_blocks=num_blocks).materialize()


def run_ray(ds, cfg, num_blocks: int):
    """The near-dedup stage of ``raylm data`` on a dataset already in the object store."""
    from pipelines.data.dedup import near_duplicate_clusters
    return near_duplicate_clusters(ds, cfg, num_blocks).keepers  # materialized on the cluster


def measure(name, fn, n_docs, truth, baseline_rate=None):
    """``fn`` returns the keepers, or (seconds it measured itself, keepers)."""
    start = time.perf_counter()
    keepers = fn()
    seconds = time.perf_counter() - start
    if isinstance(keepers, tuple):
        seconds, keepers = keepers
    if not hasattr(keepers, "itertuples"):  # a Ray Dataset: fetched for scoring only, after the clock
        keepers = keepers.to_pandas()
    p, r = precision_recall(pairs_of(clusters_from_keepers(keepers)), truth)
    rate = n_docs / seconds
    ratio = f"{rate / baseline_rate:5.2f}x" if baseline_rate else "1.00x (baseline)"
    print(f"{name:14s} {seconds:7.2f}s {rate:9.0f} docs/s  {ratio}  precision {p:.3f}  recall {r:.3f}", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="base documents (copies are added)")
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-datatrove", action="store_true")
    args = parser.parse_args()
    corpus = planted_corpus(n_base=args.docs, words=args.words, seed=1)
    ids = [d["id"] for d in corpus.docs]
    texts = [d["text"] for d in corpus.docs]
    truth = pairs_of(corpus.clusters)
    cfg = NearDedupConfig()
    print(f"corpus: {len(ids)} docs, {sum(map(len, texts)) / 1e6:.1f} MB, {len(truth)} planted duplicate pairs, "
          f"{len(corpus.hard_negatives)} hard negatives; bands x rows {cfg.bands}x{cfg.rows}, "
          f"threshold {cfg.threshold}")
    base = measure("datasketch", lambda: run_datasketch(ids, texts, cfg), len(ids), truth)
    rates = {"raylm-local": measure("raylm-local", lambda: run_local(ids, texts, cfg), len(ids), truth, base)}
    if not args.no_datatrove:
        from datatrove_minhash import run_datatrove
        for tokenizer in ("spacy", "split"):
            try:
                rates[f"datatrove-{tokenizer}"] = measure(
                    f"datatrove-{tokenizer}", lambda tok=tokenizer: run_datatrove(ids, texts, cfg, tok, args.num_cpus),
                    len(ids), truth, base)
            except RuntimeError as exc:
                print(f"datatrove-{tokenizer}: not measured: {str(exc)[:300]}")
    if not args.no_ray:
        import ray

        from cluster.recipe import RayConfig
        from cluster.runtime import init_ray
        from pipelines.data.ray_context import configure_data_context
        init_ray(RayConfig(num_cpus=args.num_cpus))
        configure_data_context()  # as `raylm data` runs
        try:
            blocks = max(2, args.num_cpus * 2)
            run_ray(ray_dataset(ids[:2000], texts[:2000], blocks), cfg, blocks)  # warm-up, not timed
            ds = ray_dataset(ids, texts, blocks)  # loading the corpus is not part of the stage
            rates["raylm-ray"] = measure("raylm-ray", lambda: run_ray(ds, cfg, blocks), len(ids), truth, base)
        finally:
            ray.shutdown()
    for ours in ("raylm-local", "raylm-ray"):
        for other in ("datatrove-spacy", "datatrove-split"):
            if ours in rates and other in rates:
                print(f"{ours} vs {other}: {rates[ours] / rates[other]:.2f}x")


if __name__ == "__main__":
    main()
