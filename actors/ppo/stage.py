"""``raylm ppo``: PPO (or GRPO) of ``<run-dir>/sft/model`` (or any causal LM: ``--model`` / ``ppo.policy_model``)
against ``<run-dir>/reward/model`` with the four roles as Ray actors -> ``<run-dir>/ppo/model`` (the policy's
architecture, what ``raylm serve`` picks up)."""
from __future__ import annotations

import logging

from actors.ppo.prompts import builtin_prompt_chats, encode_prompts, read_prompt_chats
from cluster.rundir import read_metrics
from cluster.stage import StageContext
from pipelines.hf_models import check_base_model, load_tokenizer

log = logging.getLogger("raylm")


def curve(stage_dir) -> dict:
    """First/last reward and KL over the logged steps (the last record per step wins after a resume)."""
    by_step = {r["step"]: r for r in read_metrics(stage_dir) if "step" in r and "reward_mean" in r}
    if not by_step:
        return {}
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    return {"reward_first": round(first["reward_mean"], 4), "reward_last": round(last["reward_mean"], 4),
            "kl_last": round(last["kl"], 4), "samples_per_s": round(last["samples_per_s"], 2)}


def policy_model(ctx: StageContext) -> str:
    """The policy to start from (also the reference), checked: a causal LM whose context holds a prompt and its
    response, with a tokenizer; without a reward model the critic grows a scalar head on its body."""
    cfg = ctx.recipe.ppo
    key, ref = "ppo.policy_model", cfg.policy_model
    if not ref:
        key, ref = "ppo (the SFT model)", str(ctx.run_dir.require_model("sft", "ppo"))
    return check_base_model(ref, key, cfg.max_prompt_len + cfg.max_new_tokens, "max_prompt_len + max_new_tokens",
                            scalar_head=cfg.algorithm == "ppo" and not cfg.use_reward_model)


def check_same_vocabulary(policy_tokenizer, reward_dir, policy_ref: str) -> None:
    """The reward model scores the policy's token ids as they are: both must share one vocabulary."""
    reward_tokenizer = load_tokenizer(reward_dir)
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(f"ppo: the reward model {reward_dir} and the policy {policy_ref} have different "
                         f"vocabularies ({len(reward_tokenizer)} vs {len(policy_tokenizer)} tokens): train the "
                         f"reward model from the same base (reward.base_model), or set ppo.use_reward_model=false")


def preflight(ctx: StageContext) -> None:
    if ctx.recipe.ppo.policy_model:
        policy_model(ctx)


def run(ctx: StageContext) -> dict:
    from actors.ppo.driver import PPOTrainer
    from actors.ppo.loop import run_iterations
    from actors.ppo.reward_functions import load_reward_functions
    from pipelines.model_card import card_info

    cfg, recipe = ctx.recipe.ppo, ctx.recipe
    policy_dir = policy_model(ctx)
    reward_dir = ctx.run_dir.require_model("reward", "ppo") if cfg.use_reward_model else None
    functions = load_reward_functions(cfg.reward_functions)  # a bad entry fails here, before Ray starts
    if cfg.rollout_engine == "vllm":
        from actors.ppo.vllm_engine import require_vllm

        require_vllm()
    tokenizer = load_tokenizer(policy_dir)
    if reward_dir is not None:
        check_same_vocabulary(tokenizer, reward_dir, policy_dir)
    chats = read_prompt_chats(cfg.prompts) if cfg.prompts else builtin_prompt_chats(recipe.sft.val_fraction)
    prompts = encode_prompts(tokenizer, chats, cfg.max_prompt_len)
    log.info("ppo: %s with %d prompts from %s", cfg.algorithm, len(prompts), cfg.prompts or "the built-in questions")
    ctx.ray()  # started by the CLI; the actor groups are placed on it
    stage_dir, model_dir = ctx.stage_dir("ppo"), ctx.run_dir.model_dir("ppo")
    if functions:
        log.info("ppo: reward = %s", " + ".join((["reward model"] if reward_dir else [])
                                               + [f"{f.weight:g} * {f.name}" for f in functions]))
    trainer = PPOTrainer(cfg, policy_dir, reward_dir, seed=recipe.seed, pad_id=tokenizer.pad_token_id,
                         reward_functions=functions)
    try:
        result = run_iterations(trainer, cfg, prompts, stage_dir, seed=recipe.seed)
        trainer.export(model_dir, card_info(recipe, ctx.run_dir.root, "ppo"))
    finally:
        trainer.shutdown()
    return {"algorithm": cfg.algorithm, "iterations": cfg.iterations, "resumed_from": result["resumed_from"],
            **curve(stage_dir), "model": str(model_dir)}
