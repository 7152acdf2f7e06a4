"""Unit tests of the pure algorithms: MinHash/LSH, duplicate clusters, packing, stable splits."""
from __future__ import annotations

import random

import numpy as np
import pandas as pd

from pipelines.data.components import bucket_pairs, duplicate_keepers, mark_exact_duplicates
from pipelines.data.minhash import MinHasher, estimated_jaccard, exact_jaccard, shingle_set
from pipelines.data.pack import is_validation, pack, unigram_entropy_nats


def _doc(rng: random.Random, n: int = 300) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    mh = MinHasher(num_perm=256, shingle_size=5, bands=32, rows=8)
    base = _doc(rng).split()
    variants = []
    for changes in (0, 3, 10, 40, 150):
        words = list(base)
        for i in rng.sample(range(len(words)), changes):
            words[i] = f"x{rng.randrange(10**6)}"
        variants.append(" ".join(words))
    sig = mh.signatures([" ".join(base)] + variants)
    for i, text in enumerate(variants):
        truth = exact_jaccard(shingle_set(" ".join(base), 5), shingle_set(text, 5))
        assert abs(estimated_jaccard(sig[0], sig[i + 1]) - truth) < 0.1, (i, truth)


def test_minhash_is_stable_across_instances_and_batches():
    rng = random.Random(1)
    docs = [_doc(rng, n) for n in (1, 3, 50, 400)] + ["", "Café, CAFÉ!"]
    one = MinHasher(num_perm=64, shingle_size=5, bands=8, rows=8, seed=7).signatures(docs)
    split = np.vstack([MinHasher(num_perm=64, shingle_size=5, bands=8, rows=8, seed=7).signatures([d])
                       for d in docs])
    assert (one == split).all()
    other_seed = MinHasher(num_perm=64, shingle_size=5, bands=8, rows=8, seed=8).signatures(docs)
    assert (one[3] != other_seed[3]).any()


def test_case_and_punctuation_do_not_matter_and_empty_docs_have_no_words():
    mh = MinHasher(num_perm=32, shingle_size=2, bands=4, rows=8)
    sig = mh.signatures(["Hello, World! again", "hello world again", ""])
    assert (sig[0] == sig[1]).all()
    assert (sig[2] == np.uint32(0xFFFFFFFF)).all()


def test_band_keys_match_exactly_when_band_rows_match():
    mh = MinHasher(num_perm=16, shingle_size=1, bands=4, rows=4)
    sig = np.arange(32, dtype=np.uint32).reshape(2, 16)
    sig[1, :4] = sig[0, :4]  # band 0 equal, the rest different
    keys = mh.band_keys(sig)
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
    same = mh.band_keys(np.vstack([sig[0], sig[0]]))
    assert len(set(same[0].tolist())) == 4  # the band index is part of the key


def test_duplicate_keepers_connects_chains_and_keeps_smallest_id():
    left = np.array(["d", "c", "x", "b"], dtype=object)
    right = np.array(["c", "b", "y", "a"], dtype=object)
    out = duplicate_keepers(left, right).set_index("id")
    assert out.loc[["a", "b", "c", "d"], "keeper"].tolist() == ["a"] * 4
    assert out.loc["d", "cluster_size"] == 4
    assert out.loc["y", "keeper"] == "x"
    assert len(duplicate_keepers(np.array([], object), np.array([], object))) == 0


def test_mark_exact_and_bucket_pairs():
    df = pd.DataFrame({"id": ["b", "a", "c", "d"], "dedup_key": ["k", "k", "k", "z"]})
    marked = mark_exact_duplicates(df).set_index("id")
    assert marked.loc["a", "duplicate_of"] == "" and marked.loc["b", "duplicate_of"] == "a"
    assert marked.loc["c", "cluster_size"] == 3 and marked.loc["d", "duplicate_of"] == ""
    buckets = pd.DataFrame({"band_key": [1, 1, 1, 2, 3, 3], "id": ["q", "p", "r", "s", "t", "t"]})
    pairs = bucket_pairs(buckets)
    assert sorted(map(tuple, pairs[["id", "other"]].to_numpy().tolist())) == [("q", "p"), ("r", "p"), ("r", "q")]


def test_pack_records_document_starts_and_drops_only_the_tail():
    rows, starts, dropped = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], eos_id=0, seq_len=4)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert starts == [[0], [0, 3], []]
    assert dropped == 1 and rows.dtype == np.int32
    rows, starts, dropped = pack([[1]], eos_id=0, seq_len=4)
    assert rows.shape == (0, 4) and dropped == 2


def test_validation_split_is_stable_and_about_the_fraction():
    ids = [f"doc-{i}" for i in range(20000)]
    share = sum(is_validation(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [is_validation(i, 0.05) for i in ids[:100]] == [is_validation(i, 0.05) for i in ids[:100]]


def test_unigram_entropy():
    assert abs(unigram_entropy_nats(np.array([5, 5, 5, 5])) - np.log(4)) < 1e-9
    assert unigram_entropy_nats(np.array([0, 7])) == 0.0
