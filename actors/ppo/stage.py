"""``raylm ppo``: PPO (or GRPO) of ``<run-dir>/sft/model`` against ``<run-dir>/reward/model`` with the four
roles as Ray actors -> ``<run-dir>/ppo/model`` (``LlamaForCausalLM``, what ``raylm serve`` picks up)."""
from __future__ import annotations

import logging

from actors.ppo.prompts import builtin_prompt_chats, encode_prompts, read_prompt_chats
from cluster.rundir import read_metrics
from cluster.stage import StageContext

log = logging.getLogger("raylm")


def curve(stage_dir) -> dict:
    """First/last reward and KL over the logged steps (the last record per step wins after a resume)."""
    by_step = {r["step"]: r for r in read_metrics(stage_dir) if "step" in r and "reward_mean" in r}
    if not by_step:
        return {}
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    return {"reward_first": round(first["reward_mean"], 4), "reward_last": round(last["reward_mean"], 4),
            "kl_last": round(last["kl"], 4), "samples_per_s": round(last["samples_per_s"], 2)}


def run(ctx: StageContext) -> dict:
    from transformers import AutoTokenizer

    from actors.ppo.driver import PPOTrainer
    from actors.ppo.loop import run_iterations
    from actors.ppo.reward_functions import load_reward_functions

    cfg, recipe = ctx.recipe.ppo, ctx.recipe
    policy_dir = ctx.run_dir.require_model("sft", "ppo")
    reward_dir = ctx.run_dir.require_model("reward", "ppo") if cfg.use_reward_model else None
    functions = load_reward_functions(cfg.reward_functions)  # a bad entry fails here, before Ray starts
    if cfg.rollout_engine == "vllm":
        from actors.ppo.vllm_engine import require_vllm

        require_vllm()
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    chats = read_prompt_chats(cfg.prompts) if cfg.prompts else builtin_prompt_chats(recipe.sft.val_fraction)
    prompts = encode_prompts(tokenizer, chats, cfg.max_prompt_len)
    log.info("ppo: %s with %d prompts from %s", cfg.algorithm, len(prompts), cfg.prompts or "the built-in questions")
    ctx.ray()  # started by the CLI; the actor groups are placed on it
    stage_dir, model_dir = ctx.stage_dir("ppo"), ctx.run_dir.model_dir("ppo")
    if functions:
        log.info("ppo: reward = %s", " + ".join((["reward model"] if reward_dir else [])
                                               + [f"{f.weight:g} * {f.name}" for f in functions]))
    trainer = PPOTrainer(cfg, str(policy_dir), reward_dir, seed=recipe.seed, pad_id=tokenizer.pad_token_id,
                         reward_functions=functions)
    try:
        result = run_iterations(trainer, cfg, prompts, stage_dir, seed=recipe.seed)
        trainer.export(model_dir)
    finally:
        trainer.shutdown()
    return {"algorithm": cfg.algorithm, "iterations": cfg.iterations, "resumed_from": result["resumed_from"],
            **curve(stage_dir), "model": str(model_dir)}
