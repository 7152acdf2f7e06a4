"""stats.json pieces: per-stage docs/bytes in and out and per-rule drops, computed with Ray Data
aggregations (the driver only ever sees one row per drop reason), and a docs/s line per stage."""
from __future__ import annotations

import logging
import time

import pandas as pd

from pipelines.data.pii import PII_KINDS

log = logging.getLogger("raylm")

CLEAN_STAGES = ("input", "normalize", "quality", "pii")


class StageClock:
    """Times the pipeline's stages and logs ``data: <stage>: N docs in S s (R docs/s)``."""

    def __init__(self) -> None:
        self.throughput: dict[str, dict] = {}
        self._start = time.perf_counter()

    def restart(self) -> None:
        self._start = time.perf_counter()

    def done(self, stage: str, docs: int) -> None:
        seconds = time.perf_counter() - self._start
        rate = docs / seconds if seconds > 0 else 0.0
        self.throughput[stage] = {"docs": int(docs), "seconds": round(seconds, 2), "docs_per_s": round(rate, 1)}
        log.info("data: %-11s %8d docs in %6.1fs (%.0f docs/s)", stage, docs, seconds, rate)
        self._start = time.perf_counter()


def partial_sums(ds, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Sum ``values`` (and count rows as ``docs``) per ``keys``: a pandas groupby inside each block on the
    workers, then the small per-block tables (blocks x distinct keys rows) summed on the driver. For small key
    spaces (drop reasons, cluster sizes) this is one cheap map, where ``groupby().aggregate`` would add a
    hash shuffle with aggregator actors."""
    def per_block(df: pd.DataFrame) -> pd.DataFrame:
        grouped = df.assign(docs=1).groupby(keys, dropna=False)[["docs", *values]].sum()
        return grouped.reset_index()

    parts = ds.select_columns(keys + values).map_batches(per_block, batch_size=None,
                                                         batch_format="pandas").take_all()
    if not parts:
        return pd.DataFrame(columns=keys + ["docs", *values])
    return pd.DataFrame(parts).groupby(keys, dropna=False)[["docs", *values]].sum().reset_index()


def reason_table(ds) -> list[dict]:
    """One row per drop reason ("" = kept): docs, bytes in/out, repaired/changed docs, PII counts."""
    values = ["bytes_in", "bytes_out", "repaired", "changed"] + [f"pii_{k}" for k in PII_KINDS]
    table = partial_sums(ds, ["reason"], values)
    return sorted(table.to_dict("records"), key=lambda r: r["reason"])


def clean_stage_stats(rows: list[dict]) -> dict:
    """Turn reason rows into {stage: {docs_in, docs_out, bytes_in, bytes_out, dropped: {rule: {...}}}}."""
    total_docs = sum(int(r["docs"]) for r in rows)
    total_bytes = sum(int(r["bytes_in"] or 0) for r in rows)
    out: dict = {}
    docs_in, bytes_in = total_docs, total_bytes
    for stage in CLEAN_STAGES:
        dropped = {r["reason"].split(":", 1)[1]: {"docs": int(r["docs"]), "bytes": int(r["bytes_in"] or 0)}
                   for r in rows if r["reason"].startswith(stage + ":")}
        docs_out = docs_in - sum(d["docs"] for d in dropped.values())
        bytes_out = bytes_in - sum(d["bytes"] for d in dropped.values())
        out[stage] = {"docs_in": docs_in, "docs_out": docs_out, "bytes_in": bytes_in, "bytes_out": bytes_out,
                      "dropped": dropped}
        docs_in, bytes_in = docs_out, bytes_out
    kept = next((r for r in rows if r["reason"] == ""), None)
    # bytes after normalization + redaction, of the documents that passed every per-document stage
    out["pii"]["bytes_out"] = int(kept["bytes_out"] or 0) if kept else 0
    out["pii"]["replaced"] = {k: int(kept[f"pii_{k}"] or 0) if kept else 0 for k in PII_KINDS}
    out["normalize"]["repaired_utf8_docs"] = sum(int(r["repaired"] or 0) for r in rows)
    out["normalize"]["changed_docs"] = sum(int(r["changed"] or 0) for r in rows)
    return out
