"""Exact and near (MinHash LSH) deduplication as Ray Data operations.

Both shuffle with ``repartition(keys=...)`` and then work on whole blocks with pandas: the same co-location
guarantee ``groupby().map_groups`` relies on, without its one Python call per group (too slow for millions
of tiny groups, see platform-facts.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cluster.schemas.data import NearDedupConfig
from pipelines.data.components import bucket_pairs, mark_exact_duplicates
from pipelines.data.graph import MEMBER_SCHEMA, connected_components, typed
from pipelines.data.minhash import MinHasher, estimated_jaccard
from pipelines.data.stats import partial_sums

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


PAIR_SCHEMA = pa.schema([("id", pa.string()), ("other", pa.string())])


@dataclass
class NearDedupResult:
    keepers: object                            # Dataset: id, keeper, cluster_size for every id in a cluster
    stats: dict = field(default_factory=dict)


def _similar_pairs(batch: pa.Table, threshold: float) -> pa.Table:
    """Candidate pairs whose signatures agree on at least ``threshold`` of the permutations -> edges u, v."""
    n = batch.num_rows
    if n == 0:
        return pa.table({"u": pa.array([], pa.string()), "v": pa.array([], pa.string())})
    a = batch.column("sig_a").combine_chunks()
    b = batch.column("sig_b").combine_chunks()
    width = a.type.list_size
    sim = estimated_jaccard(a.values.to_numpy().reshape(n, width), b.values.to_numpy().reshape(n, width))
    keep = pa.array(sim >= threshold)
    return pa.table({"u": batch.column("id").filter(keep), "v": batch.column("other").filter(keep)})


def _as_edges(batch: pa.Table) -> pa.Table:
    return pa.table({"u": batch.column("id"), "v": batch.column("other")})


def _verified_edges(pairs_ds, sig_ds, cfg: NearDedupConfig, num_blocks: int):
    """Both signatures joined onto every candidate pair (two hash joins on the cluster), then the estimated
    Jaccard check: candidates that share one LSH band by chance are dropped."""
    if cfg.threshold <= 0:
        return pairs_ds.map_batches(_as_edges, batch_format="pyarrow")
    sigs = sig_ds.select_columns(["id", "sig"])
    with_a = pairs_ds.join(sigs.rename_columns({"sig": "sig_a"}), "inner", num_blocks, on=("id",))
    with_b = with_a.join(sigs.rename_columns({"id": "other", "sig": "sig_b"}), "inner", num_blocks, on=("other",))
    return with_b.map_batches(_similar_pairs, batch_format="pyarrow", fn_args=(cfg.threshold,))


def _block_rows(table: pa.Table) -> pa.Table:
    return pa.table({"n": [table.num_rows]})


def _count_rows(ds) -> int:
    """Rows of a materialized dataset, one number per block (``count()`` may run the lineage again)."""
    return sum(row["n"] for row in ds.map_batches(_block_rows, batch_size=None, batch_format="pyarrow").take_all())


def _centres(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("id"), table.column("keeper")))


def _cluster_stats(keepers_ds) -> dict:
    """Cluster count and size histogram (one row per block and cluster size reaches the driver)."""
    sizes = partial_sums(keepers_ds.map_batches(_centres, batch_format="pyarrow"), ["cluster_size"], [])
    sizes = sizes.sort_values("cluster_size")
    return {"clusters": int(sizes["docs"].sum()),
            "cluster_sizes": {str(int(k)): int(v) for k, v in zip(sizes["cluster_size"], sizes["docs"])},
            "duplicates": int(((sizes["cluster_size"] - 1) * sizes["docs"]).sum())}


def near_duplicate_clusters(ds, cfg: NearDedupConfig, num_blocks: int) -> NearDedupResult:
    """LSH candidates grouped by band key across the cluster, verified by estimated Jaccard, then connected
    into clusters (keeper = smallest id), all as Ray Data operations: the driver only sees counts."""
    sig_ds = ds.select_columns(["id", "text"]).map_batches(
        signature_batch, batch_format="pyarrow", fn_args=(cfg,)).materialize()
    pairs_ds = (sig_ds.select_columns(["id", "band_keys", "has_words"])
                .map_batches(explode_band_keys, batch_format="pyarrow")
                .repartition(num_blocks, keys=["band_key"])
                .map_batches(typed(bucket_pairs, PAIR_SCHEMA), batch_size=None, batch_format="pandas")).materialize()
    stats = {"candidate_pairs": _count_rows(pairs_ds), "verified_pairs": 0, "component_rounds": 0}
    # Ray Data drops empty blocks: a dataset with no rows has no schema either, and a join with it fails
    keepers = ray.data.from_arrow(MEMBER_SCHEMA.empty_table())
    if stats["candidate_pairs"]:
        edges = _verified_edges(pairs_ds, sig_ds, cfg, num_blocks).materialize()
        stats["verified_pairs"] = _count_rows(edges)
        if stats["verified_pairs"]:
            keepers, stats["component_rounds"] = connected_components(edges, num_blocks)
    stats.update(_cluster_stats(keepers))
    return NearDedupResult(keepers=keepers, stats=stats)


def _fill_marks(table: pa.Table) -> pa.Table:
    keeper = table.column("keeper")
    is_duplicate = pc.fill_null(pc.not_equal(keeper, table.column("id")), False)  # no keeper: not in a cluster
    marks = {"duplicate_of": pc.if_else(is_duplicate, keeper, ""),
             "cluster_size": pc.cast(pc.fill_null(table.column("cluster_size"), 1), pa.int64())}
    table = table.drop_columns(["keeper", "cluster_size"])
    for name, column in marks.items():
        table = table.append_column(name, column)
    return table


def mark_near_duplicates(ds, keepers_ds, num_blocks: int):
    """Documents left-joined with the cluster members on ``id``: adds ``duplicate_of`` (the cluster's keeper,
    "" for keepers and unique documents) and ``cluster_size``. ``ds`` must not have those columns yet."""
    return ds.join(keepers_ds, "left_outer", num_blocks, on=("id",)).map_batches(_fill_marks, batch_format="pyarrow")
