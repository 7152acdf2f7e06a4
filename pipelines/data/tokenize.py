"""The tokenize stage: train the run's tokenizer when it has none, tokenize + pack on the workers, write the
shards. The manifest is written by the caller, after stats.json: it is the very last file of the stage."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from cluster.storage import ObjectPath, location
from pipelines.data.outputs import DataOutputs
from pipelines.data.pack import pack_group, tokenize_pack_batch
from pipelines.data.shards import finalize_shards, write_manifest, write_shard_block

log = logging.getLogger("raylm")


def tokenizer_dir(recipe, outputs: DataOutputs) -> Path | ObjectPath:
    return location(recipe.tokenizer.path).resolve() if recipe.tokenizer.path else outputs.root / "tokenizer"


def _sample_texts(kept, limit: int, n_docs: int) -> Iterator[str]:
    """The first ``limit`` kept documents by id, streamed to the trainer (never all held at once). By id: the
    first ones Ray Data yields differ between runs, and so would the tokenizer."""
    sample = kept.sort("id").limit(limit) if n_docs > limit else kept
    for batch in sample.select_columns(["text"]).iter_batches(batch_format="pyarrow", batch_size=256):
        yield from batch.column("text").to_pylist()


def ensure_tokenizer(recipe, kept, outputs: DataOutputs, n_docs: int) -> tuple[Path | ObjectPath, bool]:
    from pipelines.lineage import stale_inputs
    from pipelines.tokenizer import train_tokenizer

    path = tokenizer_dir(recipe, outputs)
    if (path / "tokenizer.json").is_file():
        changed = [] if recipe.tokenizer.path else stale_inputs(outputs.root.parent, recipe, "data")
        if not changed:
            log.info("data: reusing the tokenizer at %s", path)
            return path, False
        # the run's own tokenizer was trained on a corpus that has changed since: never reused as if up to date
        log.warning("data: the corpus changed since the tokenizer at %s was trained (%s%s): training a new one",
                    path, ", ".join(changed[:3]), f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if recipe.tokenizer.path:
        raise FileNotFoundError(f"tokenizer.path: {path} has no tokenizer.json")
    log.info("data: training a %d-token BPE tokenizer on up to %d documents", recipe.tokenizer.vocab_size,
             recipe.tokenizer.train_docs)
    train_tokenizer(_sample_texts(kept, recipe.tokenizer.train_docs, n_docs), path, recipe.tokenizer.vocab_size,
                    min_frequency=recipe.tokenizer.min_frequency)
    return path, True


def with_pack_group(batch: pa.Table, groups: int) -> pa.Table:
    ids = batch.column("id").to_pylist()
    return batch.append_column("pack_group", pa.array([pack_group(i, groups) for i in ids], type=pa.int64()))


def tokenize_write_group(group: pa.Table, tokenizer_file: str, eos_id: int, seq_len: int, val_fraction: float,
                         out_dir: str, vocab_size: int) -> pa.Table:
    """Ray Data UDF over one pack group: its documents in (id, text) order -> packed rows -> one temp shard per
    split named after the group (summary rows for ``finalize_shards``)."""
    tag = f"{group.column('pack_group')[0].as_py():05d}"
    docs = group.select(["id", "text"]).sort_by([("id", "ascending"), ("text", "ascending")])
    packed = tokenize_pack_batch(docs, tokenizer_file, eos_id, seq_len, val_fraction)
    return write_shard_block(packed, out_dir, vocab_size, tag)


def tokenize_stage(recipe, kept, outputs: DataOutputs, n_docs: int) -> tuple[dict, dict]:
    """Returns (stats for stats.json, keyword arguments for ``write_manifest``)."""
    from pipelines.tokenizer import EOS, load_tokenizer, tokenizer_hash

    cfg = recipe.data.tokenize
    path, trained = ensure_tokenizer(recipe, kept, outputs, n_docs)
    tok = load_tokenizer(path)
    eos_id = tok.convert_tokens_to_ids(EOS)
    vocab_size = len(tok)
    # Groups by a hash of the id, not Ray Data's batches: their membership and order depend on which block
    # finished first, and a rerun must write the same shards byte for byte (pretrain's checkpoints are tied to
    # them through lineage). ~batch_docs documents per group; map_groups is slow only with many tiny groups.
    groups = max(1, -(-n_docs // cfg.batch_docs))
    summaries = (kept.select_columns(["id", "text"])
                 .map_batches(with_pack_group, fn_args=(groups,), batch_format="pyarrow")
                 .groupby("pack_group")
                 .map_groups(tokenize_write_group, batch_format="pyarrow",
                             fn_args=(str(path / "tokenizer.json"), eos_id, cfg.seq_len, cfg.val_fraction,
                                      str(outputs.shards), vocab_size))
                 .take_all())
    totals = finalize_shards(summaries, outputs.shards, vocab_size)
    stats = {"tokenizer_dir": str(path), "tokenizer_trained": trained, "vocab_size": vocab_size,
             "seq_len": cfg.seq_len, "splits": totals["splits"], "dropped_tail_tokens": totals["dropped_tokens"],
             "unigram_entropy_nats": totals["unigram_entropy_nats"]}
    manifest = {"seq_len": cfg.seq_len, "vocab_size": vocab_size, "tokenizer_dir": path,
                "tokenizer_hash": tokenizer_hash(path), "eos_id": eos_id, "totals": totals}
    return stats, manifest


def publish_manifest(outputs: DataOutputs, manifest: dict) -> Path:
    return write_manifest(outputs.shards, **manifest)
