"""``raylm pretrain``: train the recipe's model on ``<run-dir>/data/shards`` and export it to
``<run-dir>/pretrain/model`` (Hugging Face format). Running it again on the same run dir resumes."""
from __future__ import annotations

import logging

from cluster.config import ConfigError, atomic_write_json
from cluster.recipe import Recipe
from cluster.stage import StageContext
from pipelines.model_card import card_info
from pipelines.pretrain.shards import read_manifest
from pipelines.pretrain.task import pretrain_task
from pipelines.train.engine import fit

log = logging.getLogger("raylm")


def check_compatible(recipe: Recipe, manifest: dict, source: str) -> None:
    """The recipe's model must fit the shards it trains on; errors name the recipe key."""
    if manifest["seq_len"] - 1 > recipe.model.max_seq_len:
        raise ConfigError(f"model.max_seq_len: {recipe.model.max_seq_len} is shorter than the shards' sequences "
                          f"({manifest['seq_len']} tokens, {source})")
    if recipe.pretrain.pipeline_stages > 1 and recipe.model.tie_embeddings:
        # A weight shared by the first and last stage would need DeepSpeed's TiedLayerSpec on both sides.
        raise ConfigError("pretrain.pipeline_stages: pipeline parallelism needs model.tie_embeddings=false")


def run(ctx: StageContext) -> dict:
    recipe = ctx.recipe
    shards_dir = ctx.run_dir.root / "data" / "shards"
    manifest = read_manifest(shards_dir)
    check_compatible(recipe, manifest, str(shards_dir / "manifest.json"))
    stage_dir = ctx.stage_dir("pretrain")
    task = pretrain_task(recipe.model, recipe.pretrain, manifest, shards_dir, recipe.seed,
                         card=card_info(recipe, ctx.run_dir.root, "pretrain"))
    export_dir = ctx.run_dir.model_dir("pretrain")
    summary = fit(task, recipe.pretrain, stage_dir, seed=recipe.seed, pipeline_stages=recipe.pretrain.pipeline_stages,
                  export_dir=export_dir)
    summary.update(unigram_entropy_nats=round(manifest["unigram_entropy_nats"], 4), model=str(export_dir))
    atomic_write_json(stage_dir / "summary.json", summary)
    log.info("pretrain: %s", summary)
    return summary
