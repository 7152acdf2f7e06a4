"""``raylm dpo``: direct preference optimization of ``<run-dir>/sft/model`` on preference pairs (the data
``raylm reward`` takes) -> ``<run-dir>/dpo/model`` (a causal LM, what ``raylm serve`` and ``raylm eval`` pick up).

1. Reference actors over the frozen SFT model score every pair once (``actors.dpo.scoring``); the log-probs are
   stored with the pairs in ``<run-dir>/dpo/data/``, so training holds one model, not two.
2. The shared engine trains the policy (a ``TrainTask``: Ray Train + DeepSpeed ZeRO, resume, metrics per step:
   loss, chosen/rejected implicit rewards, margin, accuracy).
3. Scoring actors over the exported model measure the held-out pairs: ``<run-dir>/dpo/heldout.json``.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch

from actors import algos
from actors.dpo.data import dpo_batches, encode_pairs, save_rows
from actors.dpo.scoring import pair_logps
from actors.dpo.task import count_tokens, dpo_step_loss
from cluster.config import atomic_write_json
from cluster.rundir import MetricsLog
from cluster.stage import StageContext

log = logging.getLogger("raylm")


def check_base(ctx: StageContext) -> Path:
    """The run's SFT model, checked (directory, config, causal-LM head, a context of dpo.max_len, tokenizer)."""
    from pipelines.hf_models import check_base_model

    base = ctx.run_dir.require_model("sft", "dpo")
    check_base_model(str(base), "dpo (the sft model)", ctx.recipe.dpo.max_len, "dpo.max_len")
    return base


def preflight(ctx: StageContext) -> None:
    """Before Ray starts: the pair file parses (a bad record names file:line and field) and, unless this
    ``raylm run`` trains it first, the SFT model is there."""
    from pipelines.reward.data import read_pairs

    if ctx.recipe.dpo.data:
        read_pairs(ctx.recipe.dpo.data)
    if "sft" not in ctx.options.get("stages", ()):
        check_base(ctx)


def reference_logps(base: Path, rows: list, data_dir: Path, cfg, pad_id: int) -> tuple[list, bool]:
    """The SFT model's log-probs of every pair, from the reference actors, or from ``data/reference.json`` when
    the same weights already scored the same token ids (a resumed run does not score them again)."""
    import hashlib
    import json

    from pipelines.eval.model_eval import weights_sha256

    key = {"sft_weights_sha256": weights_sha256(base),
           "pairs_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}
    path = data_dir / "reference.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return [tuple(x) for x in saved["logps"]], True
    logps = pair_logps(str(base), rows, cfg.reference, batch_size=cfg.reference_batch_size, pad_id=pad_id)
    atomic_write_json(path, {"key": key, "logps": logps})
    return logps, False


def heldout_metrics(ref: list[tuple[float, float]], policy: list[tuple[float, float]], beta: float) -> dict:
    """DPO's implicit-reward accuracy and margins on held-out pairs, and how often the model itself (raw
    sequence log-prob) prefers the chosen reply, before (the SFT model) and after training."""
    ref_t, pol_t = torch.tensor(ref, dtype=torch.float64), torch.tensor(policy, dtype=torch.float64)
    loss, stats = algos.dpo_loss(pol_t[:, 0], pol_t[:, 1], ref_t[:, 0], ref_t[:, 1], beta)
    return {"val_pairs": len(ref), "val_dpo_loss": round(float(loss), 4),
            **{f"val_{k}": round(float(v), 4) for k, v in stats.items()},
            "val_logp_accuracy_before": round(float((ref_t[:, 0] > ref_t[:, 1]).double().mean()), 4),
            "val_logp_accuracy_after": round(float((pol_t[:, 0] > pol_t[:, 1]).double().mean()), 4)}


def run(ctx: StageContext) -> dict:
    from transformers import AutoTokenizer

    from pipelines.hf_models import export_hf_model, load_causal_lm
    from pipelines.model_card import card_info
    from pipelines.reward.stage import split_preferences
    from pipelines.train.engine import TrainTask, fit

    cfg, recipe = ctx.recipe.dpo, ctx.recipe
    base = check_base(ctx)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, val = split_preferences(cfg.data, cfg.val_fraction, recipe.seed)
    need = cfg.num_workers * cfg.micro_batch_size
    if len(train) < need or len(val) < 1:
        raise ValueError(f"dpo.data: {len(train)} training / {len(val)} validation pairs; training needs at least "
                         f"num_workers x micro_batch_size = {need}, validation at least 1")
    train_rows = encode_pairs(tokenizer, train, cfg.max_len, cfg.max_prompt_len)
    val_rows = encode_pairs(tokenizer, val, cfg.max_len, cfg.max_prompt_len)
    log.info("dpo: %d training / %d held-out pairs from %s", len(train), len(val),
             cfg.data or "the built-in Q/A pairs")
    ctx.ray()  # started by the CLI; the reference actors and Ray Train run on it
    stage_dir, model_dir = ctx.stage_dir("dpo"), ctx.run_dir.model_dir("dpo")
    data_dir = stage_dir / "data"
    t0 = time.perf_counter()
    ref, reused = reference_logps(base, train_rows + val_rows, data_dir, cfg, pad_id)
    reference_s = time.perf_counter() - t0
    log.info("dpo: reference log-probs of %d pairs %s in %.1f s", len(ref),
             "reused from " + str(data_dir / "reference.json") if reused else "computed by the reference actors",
             reference_s)
    save_rows(data_dir, "train", train_rows, ref[:len(train_rows)])
    save_rows(data_dir, "validation", val_rows, ref[len(train_rows):])
    task = TrainTask(
        build_model=partial(load_causal_lm, str(base)),
        loss_fn=partial(dpo_step_loss, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing),
        batches=partial(dpo_batches, data_dir=str(data_dir), micro_batch_size=cfg.micro_batch_size, pad_id=pad_id,
                        seed=recipe.seed),
        export=partial(export_hf_model, base_dir=str(base), kind="causal",
                       card=card_info(recipe, ctx.run_dir.root, "dpo")),
        count_tokens=count_tokens,
    )
    summary = fit(task, cfg, stage_dir, seed=recipe.seed, export_dir=model_dir)
    out = {**summary, "train_pairs": len(train), "val_pairs": len(val), "reference_s": round(reference_s, 1),
           "reference_reused": reused,
           "model": str(model_dir)}
    if summary.get("steps") != cfg.max_steps:  # stop_at_step: no export yet, nothing to measure
        return out
    # Measured on the exported model, which also proves it loads again.
    held_out = heldout_metrics(ref[len(train_rows):], pair_logps(
        str(model_dir), val_rows, cfg.reference, batch_size=cfg.reference_batch_size, pad_id=pad_id,
        name="heldout"), cfg.beta)
    atomic_write_json(stage_dir / "heldout.json", {**held_out, "steps": summary.get("steps"), "beta": cfg.beta,
                                                   "loss_type": cfg.loss_type, "data": cfg.data})
    metrics = MetricsLog(stage_dir, tensorboard=False)
    metrics.log({"eval_step": summary.get("steps"), **held_out})
    metrics.close()
    return {**out, **held_out}
