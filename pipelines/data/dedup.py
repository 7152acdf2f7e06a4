"""Exact and near (MinHash LSH) deduplication as Ray Data operations.

Both shuffle with ``repartition(keys=...)`` and then work on whole blocks with pandas: the same co-location
guarantee ``groupby().map_groups`` relies on, without its one Python call per group (too slow for millions
of tiny groups, see platform-facts.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from cluster.schemas.data import NearDedupConfig
from pipelines.data.components import bucket_pairs, duplicate_keepers, mark_exact_duplicates
from pipelines.data.minhash import MinHasher, estimated_jaccard

log = logging.getLogger("raylm")


def exact_dedup(ds, num_blocks: int):
    """Adds ``duplicate_of`` ("" for keepers) and ``cluster_size`` to every row of ``ds``."""
    return ds.repartition(num_blocks, keys=["dedup_key"]).map_batches(
        mark_exact_duplicates, batch_size=None, batch_format="pandas")


def hasher(cfg: NearDedupConfig) -> MinHasher:
    return MinHasher(num_perm=cfg.num_perm, shingle_size=cfg.shingle_size, bands=cfg.bands, rows=cfg.rows,
                     seed=cfg.seed)


def signature_batch(batch: pa.Table, cfg: NearDedupConfig) -> pa.Table:
    """ids + MinHash signatures + LSH band keys of a batch of documents."""
    mh = hasher(cfg)
    sig = mh.signatures(batch.column("text"))
    keys = mh.band_keys(sig)
    no_words = (sig == np.uint32(0xFFFFFFFF)).all(axis=1)
    n = len(sig)
    return pa.table({
        "id": batch.column("id"),
        "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), mh.num_perm),
        "band_keys": pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), mh.bands),
        "has_words": pa.array(~no_words if n else np.zeros(0, bool)),
    })


def explode_band_keys(batch: pa.Table) -> pa.Table:
    """(id, band_keys[bands]) -> one (band_key, id) row per band, for documents with words."""
    batch = batch.filter(batch.column("has_words"))
    keys = batch.column("band_keys").combine_chunks()
    bands = keys.type.list_size
    ids = np.asarray(batch.column("id").to_numpy(zero_copy_only=False), dtype=object)
    return pa.table({"band_key": keys.values, "id": pa.array(np.repeat(ids, bands), type=pa.string())})


@dataclass
class NearDedupResult:
    keepers: pd.DataFrame                      # id, keeper, cluster_size for every id in a duplicate cluster
    stats: dict = field(default_factory=dict)


def _collect_pairs(pairs_ds) -> tuple[np.ndarray, np.ndarray]:
    left, right = [], []
    for batch in pairs_ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        left.append(batch.column("id").to_numpy(zero_copy_only=False))
        right.append(batch.column("other").to_numpy(zero_copy_only=False))
    if not left:
        return np.zeros(0, object), np.zeros(0, object)
    return np.concatenate(left).astype(object), np.concatenate(right).astype(object)


def _signatures_of(sig_ds, wanted: set[str]) -> dict[str, np.ndarray]:
    """Signatures of just the documents in candidate pairs (a filter runs on the workers)."""

    wanted_ids = sorted(wanted)  # passed by value: Ray Data does not resolve ObjectRefs in fn_args

    def keep_wanted(batch: pa.Table, wanted_ids) -> pa.Table:
        import pyarrow.compute as pc
        return batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(wanted_ids, type=pa.string())))

    out: dict[str, np.ndarray] = {}
    picked = sig_ds.select_columns(["id", "sig"]).map_batches(
        keep_wanted, batch_format="pyarrow", fn_args=(wanted_ids,))
    for batch in picked.iter_batches(batch_format="pyarrow", batch_size=65536):
        sigs = batch.column("sig").combine_chunks()
        matrix = sigs.values.to_numpy().reshape(len(batch), sigs.type.list_size)
        for doc_id, row in zip(batch.column("id").to_pylist(), matrix):
            out[doc_id] = row
    return out


def near_duplicate_clusters(ds, cfg: NearDedupConfig, num_blocks: int) -> NearDedupResult:
    """LSH candidates grouped by band key across the cluster, verified by estimated Jaccard, then
    connected into clusters (keeper = smallest id)."""
    sig_ds = ds.select_columns(["id", "text"]).map_batches(
        signature_batch, batch_format="pyarrow", fn_args=(cfg,)).materialize()
    pairs_ds = (sig_ds.select_columns(["id", "band_keys", "has_words"])
                .map_batches(explode_band_keys, batch_format="pyarrow")
                .repartition(num_blocks, keys=["band_key"])
                .map_batches(bucket_pairs, batch_size=None, batch_format="pandas"))
    left, right = _collect_pairs(pairs_ds)
    candidates = pd.DataFrame({"id": left, "other": right}).drop_duplicates()
    stats = {"candidate_pairs": len(candidates)}
    if cfg.threshold > 0 and len(candidates):
        sigs = _signatures_of(sig_ds, set(candidates["id"]) | set(candidates["other"]))
        a = np.stack([sigs[i] for i in candidates["id"]])
        b = np.stack([sigs[i] for i in candidates["other"]])
        candidates = candidates[estimated_jaccard(a, b) >= cfg.threshold]
    stats["verified_pairs"] = len(candidates)
    keepers = duplicate_keepers(candidates["id"].to_numpy(), candidates["other"].to_numpy())
    clusters = keepers[keepers["id"] == keepers["keeper"]]
    stats["clusters"] = len(clusters)
    stats["cluster_sizes"] = {str(k): int(v) for k, v in clusters["cluster_size"].value_counts().sort_index().items()}
    stats["duplicates"] = int((keepers["id"] != keepers["keeper"]).sum())
    return NearDedupResult(keepers=keepers, stats=stats)


def mark_near_duplicates(batch: pd.DataFrame, keepers: pd.DataFrame) -> pd.DataFrame:
    """Adds ``duplicate_of`` (the cluster's keeper, "" for keepers and unique documents) and ``cluster_size``."""
    by_id = keepers.set_index("id")
    keeper = batch["id"].map(by_id["keeper"])
    batch = batch.copy()
    batch["duplicate_of"] = np.where(keeper.notna() & (keeper != batch["id"]), keeper, "").astype(str)
    batch["cluster_size"] = batch["id"].map(by_id["cluster_size"]).fillna(1).astype(np.int64)
    return batch
