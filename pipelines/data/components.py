"""Per-block dedup functions (exact keepers, LSH bucket pairs) and ``duplicate_keepers``: connected components
of candidate pairs in one process with scipy, keeper = the smallest id. ``raylm data`` computes components on
the cluster (pipelines/data/graph.py); ``duplicate_keepers`` serves the single-process path, the benchmark's
baselines and the tests, as the reference the distributed result must equal.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def duplicate_keepers(left: np.ndarray, right: np.ndarray) -> pd.DataFrame:
    """Edges (left[i], right[i]) between string ids -> rows ``id, keeper, cluster_size`` for every id in an
    edge; ``keeper`` is the smallest id of its connected component (deterministic whatever the edge order)."""
    if len(left) == 0:
        return pd.DataFrame({"id": pd.Series([], dtype=object), "keeper": pd.Series([], dtype=object),
                             "cluster_size": pd.Series([], dtype=np.int64)})
    codes, ids = pd.factorize(np.concatenate([np.asarray(left, dtype=object), np.asarray(right, dtype=object)]),
                              sort=True)  # sorted: code order == id order, so min code == min id
    n = len(ids)
    half = len(left)
    graph = coo_matrix((np.ones(half, dtype=np.int8), (codes[:half], codes[half:])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    frame = pd.DataFrame({"code": np.arange(n), "label": labels})
    keeper_code = frame.groupby("label")["code"].transform("min").to_numpy()
    size = frame.groupby("label")["code"].transform("size").to_numpy()
    return pd.DataFrame({"id": ids.astype(object), "keeper": ids[keeper_code].astype(object),
                         "cluster_size": size.astype(np.int64)})


def mark_exact_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Per block after a hash shuffle on ``dedup_key``: every copy of a key sits in this block, so the
    smallest id per key is the keeper; the others get ``duplicate_of`` = that id."""
    keeper = df.groupby("dedup_key")["id"].transform("min")
    size = df.groupby("dedup_key")["id"].transform("size")
    df = df.copy()
    df["duplicate_of"] = np.where(df["id"] != keeper, keeper, "")
    df["cluster_size"] = size.astype(np.int64)
    return df


def bucket_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Per block after a hash shuffle on ``band_key``: candidate pairs of every bucket with more than one
    document: each member with the bucket's smallest id (a star) and with the next smaller id (a chain), so
    a member that fails verification against the smallest id still meets its closest neighbour. Linear,
    not quadratic, in the bucket size."""
    df = df[df["band_key"].duplicated(keep=False)]  # most buckets hold one document: drop them first (cheap)
    df = df.drop_duplicates().sort_values(["band_key", "id"], kind="stable")
    smallest = df.groupby("band_key")["id"].transform("min")
    previous = df.groupby("band_key")["id"].shift(1)
    star = pd.DataFrame({"id": df["id"], "other": smallest})
    chain = pd.DataFrame({"id": df["id"], "other": previous}).dropna()
    pairs = pd.concat([star, chain], ignore_index=True)
    pairs = pairs[pairs["id"] != pairs["other"]].drop_duplicates()
    return pairs.reset_index(drop=True)
