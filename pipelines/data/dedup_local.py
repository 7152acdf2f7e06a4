"""Near dedup in one process with the same numpy MinHash, buckets, verification and components as the Ray
path: the fast path for small corpora on a couple of cores, where Ray's scheduling and shuffles are pure
overhead (benchmarks/dedup.py measures both). Holds every signature in memory: num_perm * 4 bytes a doc."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cluster.schemas.data import NearDedupConfig
from pipelines.data.components import bucket_pairs, duplicate_keepers
from pipelines.data.dedup import hasher
from pipelines.data.minhash import estimated_jaccard


def near_duplicates_local(ids: list[str], texts: list[str], cfg: NearDedupConfig,
                          batch: int = 2048) -> pd.DataFrame:
    """Rows ``id, keeper, cluster_size`` for every document in a duplicate cluster."""
    mh = hasher(cfg)
    sig = np.vstack([mh.signatures(texts[i:i + batch]) for i in range(0, len(texts), batch)]) \
        if texts else np.zeros((0, cfg.num_perm), np.uint32)
    has_words = ~(sig == np.uint32(0xFFFFFFFF)).all(axis=1)
    keys = mh.band_keys(sig[has_words])
    id_arr = np.asarray(ids, dtype=object)[has_words]
    buckets = pd.DataFrame({"band_key": keys.reshape(-1), "id": np.repeat(id_arr, mh.bands)})
    pairs = bucket_pairs(buckets)
    if cfg.threshold > 0 and len(pairs):
        row = pd.Series(np.arange(len(ids)), index=np.asarray(ids, dtype=object))
        sim = estimated_jaccard(sig[row[pairs["id"]].to_numpy()], sig[row[pairs["other"]].to_numpy()])
        pairs = pairs[sim >= cfg.threshold]
    return duplicate_keepers(pairs["id"].to_numpy(), pairs["other"].to_numpy())
