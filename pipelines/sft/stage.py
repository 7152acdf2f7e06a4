"""``raylm sft``: supervised fine-tuning of ``<run-dir>/pretrain/model``, or of any causal LM transformers loads
(``--model`` / ``sft.base_model``: a directory or hub id), on chat data -> ``<run-dir>/sft/model``.

Training runs on the shared engine (Ray Train + DeepSpeed, ``pipelines.train.engine.fit``): resume, metrics
(loss, val_loss on held-out chats), checkpoints and export all come from there.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

from cluster.stage import StageContext
from pipelines.chat.builtin_qa import builtin_pairs, split_pairs
from pipelines.chat.records import encode_chat, hash_split, pack, read_chats
from pipelines.chat.splits import save_split
from pipelines.hf_models import check_base_model, export_hf_model, load_causal_lm, load_tokenizer
from pipelines.model_card import card_info
from pipelines.sft.task import count_tokens, sft_batches, sft_loss

log = logging.getLogger("raylm")


def split_chats(data: str | None, val_fraction: float) -> tuple[list, list]:
    """(train, validation) chats: from ``data`` (held out by a stable hash of each chat) or the built-in Q/A."""
    if data:
        chats = read_chats(data)
        if not chats:
            raise ValueError(f"sft.data: {data} holds no records")
        return hash_split(chats, lambda c: json.dumps(c, sort_keys=True), val_fraction)
    train, val = split_pairs(builtin_pairs(), val_fraction)
    return [p.messages() for p in train], [p.messages() for p in val]


def encode_all(tokenizer, chats: list, max_len: int) -> list[tuple[list[int], list[int]]]:
    return [ex for ex in (encode_chat(tokenizer, c, max_len) for c in chats) if ex is not None]


def base_model(ctx: StageContext) -> str:
    """The model to fine-tune, checked (directory, config, causal-LM head, context, tokenizer)."""
    cfg = ctx.recipe.sft
    if cfg.base_model:
        return check_base_model(cfg.base_model, "sft.base_model", cfg.max_len, "sft.max_len")
    base = ctx.run_dir.require_model("pretrain", "sft")
    return check_base_model(str(base), "sft (the pretrained model)", cfg.max_len, "sft.max_len")


def preflight(ctx: StageContext) -> None:
    """A named base model is checked before Ray starts (the run's own is checked when sft runs: an earlier
    stage of ``raylm run`` may still be writing it)."""
    if ctx.recipe.sft.base_model:
        base_model(ctx)


def prepare(ctx: StageContext, base: str) -> tuple[Path, dict]:
    """Tokenize the chats once, on the driver, into ``<stage_dir>/data``; returns the dir, counts and pad id."""
    cfg = ctx.recipe.sft
    tokenizer = load_tokenizer(base)
    train_chats, val_chats = split_chats(cfg.data, cfg.val_fraction)
    train, val = encode_all(tokenizer, train_chats, cfg.max_len), encode_all(tokenizer, val_chats, cfg.max_len)
    if cfg.packing:
        train = pack(train, cfg.max_len)
    need = cfg.num_workers * cfg.micro_batch_size
    if len(train) < need or len(val) < need:
        raise ValueError(f"sft.data: {len(train)} training / {len(val)} validation examples; each needs at least "
                         f"num_workers x micro_batch_size = {need} (more data, or a larger sft.val_fraction)")
    data_dir = ctx.stage_dir("sft") / "data"
    save_split(data_dir, "train", train)
    save_split(data_dir, "validation", val)
    return data_dir, {"train_examples": len(train), "val_examples": len(val), "pad_id": tokenizer.pad_token_id}


def run(ctx: StageContext) -> dict:
    from pipelines.train.engine import TrainTask, fit

    cfg, recipe = ctx.recipe.sft, ctx.recipe
    base = base_model(ctx)
    data_dir, counts = prepare(ctx, base)
    pad_id = counts.pop("pad_id")
    log.info("sft: %s, %d training / %d validation examples from %s", base, counts["train_examples"],
             counts["val_examples"], cfg.data or "the built-in Q/A pairs")
    task = TrainTask(
        build_model=partial(load_causal_lm, base),
        loss_fn=sft_loss,
        batches=partial(sft_batches, data_dir=str(data_dir), micro_batch_size=cfg.micro_batch_size,
                        pad_id=pad_id, seed=recipe.seed),
        export=partial(export_hf_model, base_dir=base, kind="causal",
                       card=card_info(recipe, ctx.run_dir.root, "sft")),
        count_tokens=count_tokens,
    )
    summary = fit(task, cfg, ctx.stage_dir("sft"), seed=recipe.seed, export_dir=ctx.run_dir.model_dir("sft"))
    return {**summary, **counts, "base_model": base, "model": str(ctx.run_dir.model_dir("sft"))}
