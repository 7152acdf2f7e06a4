"""``raylm reward``: the SFT model (or any causal LM: ``--model`` / ``reward.base_model``) + a scalar head, trained
on preference pairs -> ``<run-dir>/reward/model`` (the architecture's ``...ForSequenceClassification``, 1 label).
Training runs on the shared engine (Ray Train + DeepSpeed)."""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from cluster.rundir import MetricsLog
from cluster.stage import StageContext
from pipelines.chat.builtin_qa import builtin_pairs, preference_pairs, split_pairs
from pipelines.chat.records import hash_split
from pipelines.chat.splits import save_split
from pipelines.hf_models import check_base_model, export_hf_model, load_tokenizer
from pipelines.model_card import card_info
from pipelines.reward.data import PreferencePair, encode_pairs, read_pairs
from pipelines.reward.task import evaluate_pairs, pairwise_loss, reward_batches

log = logging.getLogger("raylm")


def _builtin(records: list[dict]) -> list[PreferencePair]:
    return [PreferencePair((("user", r["prompt"]),), r["chosen"], r["rejected"]) for r in records]


def split_preferences(data: str | None, val_fraction: float, seed: int
                      ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if data:
        return hash_split(read_pairs(data), PreferencePair.key, val_fraction)
    train, val = split_pairs(builtin_pairs(), val_fraction)  # the same held-out questions as SFT and PPO
    return _builtin(preference_pairs(train, seed)), _builtin(preference_pairs(val, seed))


def base_model(ctx: StageContext) -> str:
    cfg = ctx.recipe.reward
    if cfg.base_model:
        return check_base_model(cfg.base_model, "reward.base_model", cfg.max_len, "reward.max_len",
                                scalar_head=True)
    base = base_model(ctx)
    return check_base_model(str(base), "reward (the SFT model)", cfg.max_len, "reward.max_len", scalar_head=True)


def preflight(ctx: StageContext) -> None:
    if ctx.recipe.reward.base_model:
        base_model(ctx)


def prepare(ctx: StageContext, base: str) -> tuple[Path, dict, list]:
    cfg = ctx.recipe.reward
    tokenizer = load_tokenizer(base)
    train, val = split_preferences(cfg.data, cfg.val_fraction, ctx.recipe.seed)
    need = cfg.num_workers * cfg.micro_batch_size
    if len(train) < need or len(val) < need:
        raise ValueError(f"reward.data: {len(train)} training / {len(val)} validation pairs; each needs at least "
                         f"num_workers x micro_batch_size = {need} (more data, or a larger reward.val_fraction)")
    train_rows, val_rows = encode_pairs(tokenizer, train, cfg.max_len), encode_pairs(tokenizer, val, cfg.max_len)
    data_dir = ctx.stage_dir("reward") / "data"
    save_split(data_dir, "train", train_rows)
    save_split(data_dir, "validation", val_rows)
    return data_dir, {"train_pairs": len(train), "val_pairs": len(val), "pad_id": tokenizer.pad_token_id}, val_rows


def run(ctx: StageContext) -> dict:
    from pipelines.hf_models import init_reward_model, load_reward_model
    from pipelines.train.engine import TrainTask, fit

    cfg, recipe = ctx.recipe.reward, ctx.recipe
    base = ctx.run_dir.require_model("sft", "reward")
    data_dir, counts, val_rows = prepare(ctx, base)
    pad_id = counts.pop("pad_id")
    log.info("reward: %d training / %d validation pairs from %s", counts["train_pairs"], counts["val_pairs"],
             cfg.data or "the built-in Q/A pairs")
    task = TrainTask(
        build_model=partial(init_reward_model, base),
        loss_fn=partial(pairwise_loss, margin=cfg.margin),
        batches=partial(reward_batches, data_dir=str(data_dir), micro_batch_size=cfg.micro_batch_size,
                        pad_id=pad_id, seed=recipe.seed),
        export=partial(export_hf_model, base_dir=base, kind="reward",
                       card=card_info(recipe, ctx.run_dir.root, "reward")),
    )
    stage_dir, model_dir = ctx.stage_dir("reward"), ctx.run_dir.model_dir("reward")
    summary = fit(task, cfg, stage_dir, seed=recipe.seed, export_dir=model_dir)
    # The engine's periodic eval reports val_loss only; accuracy and margin are measured here, on the exported
    # model (which also proves that it loads again).
    held_out = evaluate_pairs(load_reward_model(model_dir), val_rows, pad_id)
    metrics = MetricsLog(stage_dir, tensorboard=False)
    metrics.log({"eval_step": summary.get("steps"), **held_out})
    metrics.close()
    return {**summary, **counts, **held_out, "model": str(model_dir)}

