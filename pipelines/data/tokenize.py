"""The tokenize stage: train the run's tokenizer when it has none, tokenize + pack on the workers, write the
shards. The manifest is written by the caller, after stats.json: it is the very last file of the stage."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from cluster.storage import ObjectPath, location
from pipelines.data.outputs import DataOutputs
from pipelines.data.pack import tokenize_pack_batch
from pipelines.data.shards import finalize_shards, write_manifest, write_shard_block

log = logging.getLogger("raylm")


def tokenizer_dir(recipe, outputs: DataOutputs) -> Path | ObjectPath:
    return location(recipe.tokenizer.path).resolve() if recipe.tokenizer.path else outputs.root / "tokenizer"


def _sample_texts(kept, limit: int) -> Iterator[str]:
    """The first ``limit`` kept documents, streamed to the trainer (never all held at once)."""
    for batch in kept.limit(limit).select_columns(["text"]).iter_batches(batch_format="pyarrow", batch_size=256):
        yield from batch.column("text").to_pylist()


def ensure_tokenizer(recipe, kept, outputs: DataOutputs) -> tuple[Path | ObjectPath, bool]:
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
    train_tokenizer(_sample_texts(kept, recipe.tokenizer.train_docs), path, recipe.tokenizer.vocab_size,
                    min_frequency=recipe.tokenizer.min_frequency)
    return path, True


def tokenize_stage(recipe, kept, outputs: DataOutputs) -> tuple[dict, dict]:
    """Returns (stats for stats.json, keyword arguments for ``write_manifest``)."""
    from pipelines.tokenizer import EOS, load_tokenizer, tokenizer_hash

    cfg = recipe.data.tokenize
    path, trained = ensure_tokenizer(recipe, kept, outputs)
    tok = load_tokenizer(path)
    eos_id = tok.convert_tokens_to_ids(EOS)
    vocab_size = len(tok)
    packed = kept.select_columns(["id", "text"]).map_batches(
        tokenize_pack_batch, batch_size=cfg.batch_docs, batch_format="pyarrow",
        fn_args=(str(path / "tokenizer.json"), eos_id, cfg.seq_len, cfg.val_fraction))
    summaries = packed.map_batches(write_shard_block, batch_size=None, batch_format="pyarrow",
                                   fn_args=(str(outputs.shards), vocab_size)).take_all()
    totals = finalize_shards(summaries, outputs.shards, vocab_size)
    stats = {"tokenizer_dir": str(path), "tokenizer_trained": trained, "vocab_size": vocab_size,
             "seq_len": cfg.seq_len, "splits": totals["splits"], "dropped_tail_tokens": totals["dropped_tokens"],
             "unigram_entropy_nats": totals["unigram_entropy_nats"]}
    manifest = {"seq_len": cfg.seq_len, "vocab_size": vocab_size, "tokenizer_dir": path,
                "tokenizer_hash": tokenizer_hash(path), "eos_id": eos_id, "totals": totals}
    return stats, manifest


def publish_manifest(outputs: DataOutputs, manifest: dict) -> Path:
    return write_manifest(outputs.shards, **manifest)
