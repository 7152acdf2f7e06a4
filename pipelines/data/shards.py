"""Training shards: ``shards/{train,validation}-NNNNN.parquet`` written by the workers with pyarrow, and
``shards/manifest.json`` written last and atomically by the driver (no manifest = incomplete data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import atomic_write_json
from cluster.storage import ObjectPath, arrow_target, location, move
from pipelines.data.pack import SPLITS, unigram_entropy_nats

MANIFEST = "manifest.json"


def write_shard_block(batch: pa.Table, out_dir: str, vocab_size: int, tag: str) -> pa.Table:
    """One temp parquet file per split present in a block of packed rows, plus a summary row per file (path,
    sequences, tokens, unigram counts of its tokens). ``tag`` names the block (``.tmp-<split>-<tag>``): a name
    that is the same on every run, so ``finalize_shards`` numbers the files the same way every time."""
    summaries = {"split": [], "path": [], "sequences": [], "tokens": [], "dropped_tokens": [], "counts": []}
    for split in SPLITS:
        part = batch.filter(pa.compute.equal(batch.column("split"), split))
        if part.num_rows == 0:
            continue
        table = part.select(["input_ids", "doc_starts"])
        path = location(out_dir) / f".tmp-{split}-{tag}.parquet"
        filesystem, target = arrow_target(path)
        pq.write_table(table, target, filesystem=filesystem)
        flat = table.column("input_ids").combine_chunks().values.to_numpy()
        summaries["split"].append(split)
        summaries["path"].append(str(path))
        summaries["sequences"].append(part.num_rows)
        summaries["tokens"].append(len(flat))
        summaries["dropped_tokens"].append(int(pa.compute.sum(part.column("dropped_tokens")).as_py() or 0))
        summaries["counts"].append(np.bincount(flat, minlength=vocab_size).astype(np.int64).tolist())
    return pa.table({
        "split": pa.array(summaries["split"], type=pa.string()),
        "path": pa.array(summaries["path"], type=pa.string()),
        "sequences": pa.array(summaries["sequences"], type=pa.int64()),
        "tokens": pa.array(summaries["tokens"], type=pa.int64()),
        "dropped_tokens": pa.array(summaries["dropped_tokens"], type=pa.int64()),
        "counts": pa.array(summaries["counts"], type=pa.list_(pa.int64())),
    })


def finalize_shards(summaries: list[dict], shards_dir: Path | ObjectPath, vocab_size: int) -> dict:
    """Rename temp files to ``<split>-NNNNN.parquet`` (in a stable order) and total the splits."""
    splits: dict = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    dropped = 0
    for split in SPLITS:
        rows = sorted((s for s in summaries if s["split"] == split), key=lambda s: s["path"])
        files = []
        for i, row in enumerate(rows):
            final = shards_dir / f"{split}-{i:05d}.parquet"
            move(row["path"], final)
            files.append(final.name)
            if split == "train":
                counts += np.asarray(row["counts"], dtype=np.int64)
            dropped += row["dropped_tokens"]
        splits[split] = {"files": files, "sequences": int(sum(r["sequences"] for r in rows)),
                         "tokens": int(sum(r["tokens"] for r in rows))}
    return {"splits": splits, "unigram_entropy_nats": unigram_entropy_nats(counts), "dropped_tokens": dropped}


def write_manifest(shards_dir: Path | ObjectPath, *, seq_len: int, vocab_size: int,
                   tokenizer_dir: Path | ObjectPath, tokenizer_hash: str, eos_id: int, totals: dict) -> Path:
    for split in SPLITS:
        if totals["splits"][split]["sequences"] == 0:
            raise ValueError(f"data: the {split} split has no full sequence of seq_len={seq_len} tokens: "
                             "give more input, a smaller data.tokenize.seq_len or another val_fraction")
    manifest = {
        "seq_len": seq_len, "vocab_size": vocab_size, "tokenizer_dir": str(location(tokenizer_dir).resolve()),
        "tokenizer_hash": tokenizer_hash, "eos_id": eos_id,
        "unigram_entropy_nats": totals["unigram_entropy_nats"], "splits": totals["splits"],
    }
    path = shards_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path
