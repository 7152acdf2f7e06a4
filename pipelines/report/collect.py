"""What a run directory holds, read into plain dicts for the report; a missing piece is None ("not run").

Nothing here computes anything new: the numbers are the stages' own (data/stats.json, <stage>/metrics.jsonl,
eval/results.json, <stage>/lineage.json, <stage>/timing.json), so the report never disagrees with the run.
"""
from __future__ import annotations

import json
from pathlib import Path

from cluster.rundir import read_metrics

TRAIN_STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")
TIMED_STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval")
# the per-document filters of the data stage, in pipeline order (pipelines/data/stats.py CLEAN_STAGES)
FILTER_STAGES = ("input", "normalize", "quality", "pii")
DEDUP_STAGES = ("exact_dedup", "near_dedup")
EXAMPLE_PAIRS = 5


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def data_funnel(run: Path) -> dict | None:
    """Documents through each data step, drops per rule, duplicate counts and example pairs, tokens out."""
    stats = _json(run / "data" / "stats.json")
    if stats is None:
        return None
    stages = stats.get("stages", {})
    steps = [{"step": name, "docs_in": stages[name]["docs_in"], "docs_out": stages[name]["docs_out"],
              "bytes_out": stages[name].get("bytes_out")}
             for name in (*FILTER_STAGES, *DEDUP_STAGES) if name in stages]
    drops = [{"step": name, "rule": rule, "docs": d["docs"], "bytes": d["bytes"]}
             for name in FILTER_STAGES for rule, d in stages.get(name, {}).get("dropped", {}).items()]
    tok = stages.get("tokenize", {})
    splits = tok.get("splits", {})
    tokens = sum(s.get("tokens", 0) for s in splits.values())
    # Packed tokens include one EOS per document and leave out the tail that fit no sequence: corpus bytes
    # after dedup over (packed + dropped tail) tokens is the tokenizer's bytes per token on this corpus.
    kept_bytes = stages.get("near_dedup", stages.get("exact_dedup", {})).get("bytes_out")
    all_tokens = tokens + tok.get("dropped_tail_tokens", 0)
    return {"files": stats.get("input", {}).get("files"), "steps": steps, "drops": drops,
            "duplicates": {name: {k: stages[name].get(k) for k in ("duplicates", "clusters", "cluster_sizes",
                                                                   "candidate_pairs", "verified_pairs")}
                           for name in DEDUP_STAGES if name in stages},
            "pairs": duplicate_pairs(run / "data"),
            "tokens": {split: s.get("tokens") for split, s in splits.items()},
            "vocab_size": tok.get("vocab_size"), "seq_len": tok.get("seq_len"),
            "bytes_per_token": round(kept_bytes / all_tokens, 3) if kept_bytes and all_tokens else None,
            "throughput": stats.get("throughput", {})}


def duplicate_pairs(data_dir: Path, per_kind: int = EXAMPLE_PAIRS) -> list[dict]:
    """A few (dropped, kept) duplicate pairs by source file, with the start of the kept text when it was kept."""
    dropped_files = sorted((data_dir / "dropped").glob("*.parquet"))
    if not dropped_files:
        return []
    import pyarrow.parquet as pq

    dropped = pq.read_table(dropped_files, columns=["id", "reason", "duplicate_of", "source"]).to_pylist()
    chosen = []
    for kind in ("exact_dedup:duplicate", "near_dedup:duplicate"):
        rows = sorted((r for r in dropped if r["reason"] == kind and r["duplicate_of"]), key=lambda r: r["id"])
        chosen += rows[:per_kind]
    kept_ids = sorted({r["duplicate_of"] for r in chosen})
    docs_files = sorted((data_dir / "documents").glob("*.parquet"))
    # only the kept documents of the chosen pairs: the corpus text can be large
    docs = pq.read_table(docs_files, columns=["id", "text", "source"], filters=[("id", "in", kept_ids)]).to_pylist() \
        if docs_files and kept_ids else []
    source = {r["id"]: r["source"] for r in dropped} | {d["id"]: d["source"] for d in docs}
    text = {d["id"]: d["text"] for d in docs}
    return [{"kind": r["reason"].split(":")[0], "dropped": r["source"], "kept": source.get(r["duplicate_of"],
             r["duplicate_of"]), "kept_text": (text.get(r["duplicate_of"]) or "")[:240]} for r in chosen]


def curves(run: Path) -> dict[str, list[dict] | None]:
    """Each training stage's metrics.jsonl records (None: the stage did not run)."""
    return {stage: (read_metrics(run / stage) or None) for stage in TRAIN_STAGES}


def timings(run: Path) -> list[dict]:
    """Wall seconds per stage: the CLI's record (timing.json), else (a run from before it was written) the data
    stage's own step times or the span of a training stage's metrics times."""
    out = []
    for stage in TIMED_STAGES:
        rec = _json(run / stage / "timing.json")
        if rec is not None:
            out.append({"stage": stage, "seconds": rec["seconds"], "source": "raylm"})
            continue
        stats = _json(run / "data" / "stats.json") if stage == "data" else None
        if stats and stats.get("throughput"):
            seconds = sum(t["seconds"] for t in stats["throughput"].values())
            out.append({"stage": stage, "seconds": round(seconds, 1), "source": "data steps (stats.json)"})
        if stage not in TRAIN_STAGES:  # eval's metrics lines are per model and rerun: their span is no timing
            continue
        times = [m["time"] for m in read_metrics(run / stage) if "time" in m]
        if len(times) > 1:
            out.append({"stage": stage, "seconds": round(max(times) - min(times), 1), "source": "metrics span"})
    return out


def lineage(run: Path) -> list[dict] | None:
    """Every stage's lineage record, checked against the disk by ``pipelines.lineage.chain`` (re-hashes)."""
    from pipelines.lineage import RECORD, chain

    records: dict[str, dict] = {}
    for stage in ("eval", "ppo", "dpo", "reward", "sft", "pretrain", "data"):
        if stage in records or not (run / stage / RECORD).is_file():
            continue
        try:
            for doc in chain(run / stage):
                records.setdefault(doc["stage"], doc)
        except FileNotFoundError:  # a parent's record is missing: show this stage's record unchecked
            records[stage] = {**_json(run / stage / RECORD), "changed": None, "broken_parents": []}
    order = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval")
    return [records[s] for s in order if s in records] or None


def collect(run: Path) -> dict:
    run = Path(run)
    return {"run": str(run), "config": (run / "config.yaml").is_file(), "funnel": data_funnel(run),
            "curves": curves(run), "timings": timings(run), "eval": _json(run / "eval" / "results.json"),
            "lineage": lineage(run)}
