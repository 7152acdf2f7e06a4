"""``raylm data``: read -> normalize/quality/pii -> exact dedup -> near dedup -> tokenize/pack -> shards.

Ray Data from end to end: every stage runs on the cluster's workers; the driver sees file lists, one row
per drop reason, per-block counts, one summary row per written shard, and (when the run has no tokenizer)
the streamed tokenizer sample, bounded by ``tokenizer.train_docs``.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from cluster.config import atomic_write_json
from cluster.stage import StageContext
from pipelines.data.clean import clean_batch
from pipelines.data.dedup import exact_dedup, mark_near_duplicates, near_duplicate_clusters
from pipelines.data.outputs import DataOutputs
from pipelines.data.ray_context import configure_data_context
from pipelines.data.sources import CorpusReadError, list_corpus_files, read_files_batch
from pipelines.data.stats import StageClock, clean_stage_stats, partial_sums, reason_table
from pipelines.data.tokenize import publish_manifest, tokenize_stage

log = logging.getLogger("raylm")

CLEAN_BATCH = 256  # also coalesces the reader's small per-file blocks before the shuffles
DOC_COLUMNS = ["id", "text", "source", "meta"]
DROPPED_COLUMNS = ["id", "reason", "duplicate_of", "source", "bytes", "read_error"]


def _where(ds, column: str, equal: bool):
    """Rows whose ``column`` is "" (equal=True) or not "" (equal=False), filtered per block with pyarrow."""
    def keep(table: pa.Table) -> pa.Table:
        mask = pc.equal(table.column(column), "")
        return table.filter(mask if equal else pc.invert(mask))
    return ds.map_batches(keep, batch_format="pyarrow")


def _as_dropped(ds, reason: str):
    def label(table: pa.Table) -> pa.Table:
        table = table.append_column("reason", pa.array([reason] * table.num_rows, type=pa.string()))
        table = table.append_column("read_error", pa.array([""] * table.num_rows, type=pa.string()))
        return table.rename_columns({"bytes_out": "bytes"})  # size after cleaning
    return ds.select_columns(["id", "duplicate_of", "source", "bytes_out"]).map_batches(
        label, batch_format="pyarrow").select_columns(DROPPED_COLUMNS)


def _find_cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first ``kind`` in an exception's cause chain (Ray wraps worker errors in its own types)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            inner = getattr(exc, "cause", None)  # RayTaskError(kind) wraps the worker's original exception
            return inner if isinstance(inner, kind) else exc
        exc, seen = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__, seen + 1
    return None


def _as_filtered(table: pa.Table) -> pa.Table:
    table = table.append_column("duplicate_of", pa.array([""] * table.num_rows, type=pa.string()))
    return table.rename_columns({"bytes_in": "bytes"})  # size as read


def _read_and_clean(ray, cfg, clock: StageClock):
    files = list_corpus_files(cfg)
    log.info("data: %d input files (%s)", len(files), "data.input" if cfg.input else "built-in corpus")
    listing = ray.data.from_items(files, override_num_blocks=max(1, min(len(files), cfg.num_blocks * 4)))
    try:
        docs = (listing.map_batches(read_files_batch, batch_size=1, fn_args=(cfg,))
                .map_batches(clean_batch, fn_args=(cfg,), batch_format="numpy", batch_size=CLEAN_BATCH)
                .materialize())
    except Exception as exc:  # re-raised as is unless it wraps a bad input file
        read_error = _find_cause(exc, CorpusReadError)
        if read_error is None:
            raise
        raise CorpusReadError(str(read_error).split("\n")[0]) from None  # "<file>: <error>", no Ray frames
    clock.done("read+clean", docs.count())
    return files, docs


def _dedup_stats(marked) -> dict:
    """docs/bytes in and out and the cluster-size histogram of a dedup stage's marked rows."""
    table = partial_sums(marked.map_batches(_flag_duplicates, batch_format="pyarrow"),
                         ["is_duplicate", "cluster_size"], ["bytes_out"])
    dups = table[table["is_duplicate"] == 1]
    keepers = table[(table["is_duplicate"] == 0) & (table["cluster_size"] > 1)]
    docs_in, bytes_in = int(table["docs"].sum()), int(table["bytes_out"].sum())
    return {"docs_in": docs_in, "docs_out": docs_in - int(dups["docs"].sum()), "bytes_in": bytes_in,
            "bytes_out": bytes_in - int(dups["bytes_out"].sum()), "duplicates": int(dups["docs"].sum()),
            "cluster_sizes": {str(int(k)): int(v) for k, v in zip(keepers["cluster_size"], keepers["docs"])}}


def _flag_duplicates(table: pa.Table) -> pa.Table:
    flag = pc.cast(pc.not_equal(table.column("duplicate_of"), ""), pa.int64())
    return pa.table({"is_duplicate": flag, "cluster_size": table.column("cluster_size"),
                     "bytes_out": table.column("bytes_out")})


def _split_marked(marked, reason: str):
    dups = _where(marked, "duplicate_of", equal=False)
    return _where(marked, "duplicate_of", equal=True), [_as_dropped(dups, reason)]


def _exact(cfg, kept, clock: StageClock, stats: dict):
    if not cfg.exact_dedup.enabled:
        return kept, []
    marked = exact_dedup(kept, cfg.num_blocks).materialize()
    stats["exact_dedup"] = _dedup_stats(marked)
    clock.done("exact_dedup", stats["exact_dedup"]["docs_in"])
    return _split_marked(marked, "exact_dedup:duplicate")


def _near(cfg, kept, clock: StageClock, stats: dict):
    if not cfg.near_dedup.enabled:
        return kept, []
    result = near_duplicate_clusters(kept, cfg.near_dedup, cfg.num_blocks)
    unmarked = kept.select_columns(DOC_COLUMNS + ["bytes_out", "dedup_key"])  # drops exact dedup's marks
    marked = mark_near_duplicates(unmarked, result.keepers, cfg.num_blocks).materialize()
    # cluster sizes come from the components (a near-dup cluster spans blocks); the rest from the rows
    stats["near_dedup"] = {**_dedup_stats(marked), **result.stats}
    clock.done("near_dedup", stats["near_dedup"]["docs_in"])
    return _split_marked(marked, "near_dedup:duplicate")


def _write_parquet_dir(ds, outputs: DataOutputs, name: str):
    staging = outputs.staging(name)  # str(): a local path or a URI, which Ray Data resolves with pyarrow
    ds.write_parquet(str(staging))
    staging.mkdir(parents=True, exist_ok=True)  # an empty dataset writes nothing: still publish the dir
    return outputs.publish(name)


def _per_document_outputs(docs) -> tuple[dict, list, object]:
    """stats of the fused per-document stages, the dropped rows so far, and the kept documents."""
    reasons = reason_table(docs)
    stats = {"stages": clean_stage_stats(reasons), "skipped_files": []}
    if any(r["reason"] == "input:unreadable" for r in reasons):
        rows = _where(docs, "read_error", equal=False).select_columns(["source", "read_error"]).take_all()
        stats["skipped_files"] = [{"path": r["source"], "error": r["read_error"]} for r in rows]
    dropped = [_where(docs, "reason", equal=False).map_batches(_as_filtered, batch_format="pyarrow")
               .select_columns(DROPPED_COLUMNS)]
    kept = _where(docs, "reason", equal=True).select_columns(DOC_COLUMNS + ["bytes_out", "dedup_key"])
    return stats, dropped, kept


def run(ctx: StageContext) -> dict:
    recipe = ctx.recipe
    cfg = recipe.data
    outputs = DataOutputs(ctx.stage_dir("data"))
    outputs.reset()  # the stale manifest goes first: from here on, the data reads as incomplete
    ray = ctx.ray()
    configure_data_context()
    clock = StageClock()
    files, docs = _read_and_clean(ray, cfg, clock)
    stats, dropped, kept = _per_document_outputs(docs)
    stats["input"] = {"files": len(files), "builtin": not cfg.input}
    if stats["stages"]["pii"]["docs_out"] == 0:
        atomic_write_json(outputs.stats, stats)  # says why: the drops per rule
        raise ValueError(f"data: no document passed normalize/quality (see {outputs.stats}); check "
                         "data.text_field, data.quality.languages and the quality thresholds")
    clock.restart()
    for dedup in (_exact, _near):
        kept, more = dedup(cfg, kept, clock, stats["stages"])
        dropped += more
    kept = kept.select_columns(DOC_COLUMNS).materialize()
    n_kept = kept.count()
    _write_parquet_dir(kept, outputs, "documents")
    _write_parquet_dir(dropped[0].union(*dropped[1:]) if len(dropped) > 1 else dropped[0], outputs, "dropped")
    clock.done("write_docs", n_kept)
    summary = {"docs_in": stats["stages"]["input"]["docs_in"], "docs_kept": n_kept}
    manifest = None
    if cfg.tokenize.enabled:
        stats["stages"]["tokenize"], manifest = tokenize_stage(recipe, kept, outputs, n_kept)
        clock.done("tokenize", n_kept)
        summary["train_tokens"] = stats["stages"]["tokenize"]["splits"]["train"]["tokens"]
    stats["throughput"] = clock.throughput
    atomic_write_json(outputs.stats, stats)
    if manifest is not None:
        publish_manifest(outputs, manifest)  # last: its presence means the shards are complete
    return summary
