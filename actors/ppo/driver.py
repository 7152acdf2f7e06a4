"""The PPO/GRPO driver: builds the four role groups and runs generate -> score -> advantages -> train -> sync.

The driver holds no model. It moves rollout tensors between actors through the object store and computes the
advantages itself with the pure functions of ``actors.algos`` (they are cheap: O(batch x response length)).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from actors import algos
from actors.group import ActorGroup, gather, mean_stats, plan_placement, wait_ready
from actors.ppo.roles import CriticActor, PolicyActor, ReferenceActor, RewardActor
from actors.ppo.rollout import concat_batches, pad_left
from cluster.schemas.rlhf import PPOConfig

log = logging.getLogger("raylm")


@dataclass
class PromptSampler:
    """Cycles through the prompts in a seeded order, reshuffled every epoch; its state is two integers."""

    prompts: list[list[int]]
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self._order = torch.randperm(len(self.prompts), generator=g).tolist()

    def take(self, n: int) -> list[list[int]]:
        if not self._order:
            self._shuffle()
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._shuffle()


def role_config(cfg: PPOConfig, lr: float, role: str = "policy") -> dict:
    """The plain dict each role actor gets (picklable, no schema import needed in the worker)."""
    keys = ("micro_batch_size", "zero_stage", "grad_clip", "precision", "max_new_tokens", "temperature", "top_p",
            "stop_at_eos", "compile_decode", "single_update",
            "ppo_epochs", "clip_eps", "value_clip_eps", "kl_mode", "kl_estimator")
    accum = cfg.grad_accum(role) if role in ("policy", "critic") else 1
    return {**{k: getattr(cfg, k) for k in keys}, "lr": lr, "grad_accum": accum}


class PPOTrainer:
    """Owns the role groups of one PPO/GRPO run."""

    def __init__(self, cfg: PPOConfig, policy_dir: str, reward_dir: str | None, *, seed: int = 0, pad_id: int,
                 reward_functions: list | None = None):
        """``reward_dir`` None: no reward model (``use_reward_model: false``); ``reward_functions``: loaded by
        ``actors.ppo.reward_functions.load_reward_functions`` (before Ray starts, so bad entries fail early)."""
        import ray

        self.cfg, self.seed, self.pad_id = cfg, seed, pad_id
        self.grpo = cfg.algorithm == "grpo"
        roles = ("policy", "reference", "reward") + (() if self.grpo else ("critic",))
        roles += {"hf": (), "hf_engine": ("rollout",), "vllm": ("vllm",)}[cfg.rollout_engine]
        plan = plan_placement(cfg, roles)
        wait_ready(plan)
        self.placements = plan
        policy_cfg, critic_cfg = role_config(cfg, cfg.actor_lr), role_config(cfg, cfg.critic_lr, "critic")
        self.policy = ActorGroup(PolicyActor, plan["policy"],
                                 lambda r, n: ((str(policy_dir), policy_cfg, r, n, seed), {}), "policy")
        self.reference = ActorGroup(ReferenceActor, plan["reference"],
                                    lambda r, n: ((str(policy_dir), policy_cfg), {}), "reference")
        functions = list(reward_functions or [])
        reward_dir = str(reward_dir) if reward_dir is not None else None
        self.reward = ActorGroup(RewardActor, plan["reward"],
                                 lambda r, n: ((reward_dir, str(policy_dir), policy_cfg, functions), {}), "reward")
        critic_dir = reward_dir or str(policy_dir)  # no reward model: the policy's body with a fresh value head
        self.critic = None if self.grpo else ActorGroup(
            CriticActor, plan["critic"], lambda r, n: ((critic_dir, critic_cfg, r, n, seed), {}), "critic")
        self.trainable = [g for g in (self.policy, self.critic) if g is not None]
        for group in self.trainable:
            group.setup_distributed()
        self.kl_ctl = algos.KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon,
                                         cfg.kl_coef_min)
        policy_pad_id, self.eos_id = ray.get(self.policy.actors[0].special_ids.remote())
        self.rollout_engine = None
        if cfg.rollout_engine == "vllm":
            from actors.ppo.vllm_engine import VLLMRollout

            self.rollout_engine = VLLMRollout(cfg, policy_dir, plan["vllm"], policy_pad_id, self.eos_id)
        self.hf_engine = None
        if cfg.rollout_engine == "hf_engine":
            from actors.ppo.hf_engine import HFRollout

            self.hf_engine = HFRollout(cfg, policy_dir, plan["rollout"], policy_pad_id, self.eos_id, seed)
        # async_rollout: (prompts, their sampling refs, their chained reference and reward refs)
        self._pending: tuple[list[list[int]], list, tuple] | None = None
        self._ref_logprobs: list | None = None
        self._reward_refs: list | None = None  # the reward's calls chained on the sampling (``_chain_scoring``)

    # --- one iteration -------------------------------------------------------------------------------------
    def _prompt_batch(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_left(prompts, self.pad_id)
        return {"prompt_ids": ids, "prompt_mask": mask}

    def _generate(self, prompts: list[list[int]], next_prompts: list[list[int]] | None = None
                  ) -> dict[str, torch.Tensor]:
        """The batch for ``prompts``; with ``async_rollout`` the one submitted last step if it was for them,
        and ``next_prompts`` submitted now, to be sampled while this batch trains."""
        if self.hf_engine is not None:
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == prompts:
                refs, (self._ref_logprobs, self._reward_refs) = pending[1], pending[2]
            else:
                refs = self.hf_engine.submit(self._prompt_batch(prompts))
                self._ref_logprobs, self._reward_refs = self._chain_scoring(refs, len(prompts))
            if self.cfg.async_rollout and next_prompts is not None:
                # Queued on each engine behind this batch and before the weights this update will push; the
                # frozen reference and the reward score each shard once sampled, never stale.
                next_refs = self.hf_engine.submit(self._prompt_batch(next_prompts))
                self._pending = (next_prompts, next_refs, self._chain_scoring(next_refs, len(next_prompts)))
            return self.hf_engine.collect(refs)
        batch = self._prompt_batch(prompts)
        if self.rollout_engine is not None:
            return self.rollout_engine.generate(batch, self.policy)
        refs = self.policy.scatter("generate", batch)
        self._ref_logprobs, self._reward_refs = self._chain_scoring(refs, len(prompts))
        return gather(refs, self.pad_id)

    def _chain_scoring(self, refs: list, rows: int) -> tuple[list | None, list | None]:
        """Send each sampled shard straight from the actor that sampled it to the reference (one replica per
        shard) and to the reward, so they start as soon as it is ready, not after the driver gathered and
        re-split the batch (one round trip through the driver less per iteration; same shards, same values).
        Returns their refs (None where the replica counts do not match the shards: ``_score`` scatters then)."""
        ref_refs = reward_refs = None
        if len(self.reference) == len(refs):
            ref_refs = [a.logprobs.remote(r) for a, r in zip(self.reference.actors, refs)]
        if len(self.reward) == 1 or len(self.reward) == len(refs):
            starts = [rows * i // len(refs) for i in range(len(refs))]  # split_batch's bounds
            actors = self.reward.actors * len(refs) if len(self.reward) == 1 else self.reward.actors
            reward_refs = [a.score.remote(r, first_index=s) for a, r, s in zip(actors, refs, starts)]
        return ref_refs, reward_refs

    def _score(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reward, reference log-probs and values, all roles working at once."""
        import ray

        reward_refs, self._reward_refs = self._reward_refs, None  # chained on the sampling, if it was
        if reward_refs is None:
            indexed = {**batch, "index": torch.arange(len(batch["sequences"]))}  # names failing samples
            reward_refs = self.reward.scatter("score", indexed)  # all three roles work at once
        ref_refs, self._ref_logprobs = self._ref_logprobs, None  # chained on the sampling, if it was
        if ref_refs is None:
            ref_refs = self.reference.scatter("logprobs", batch)
        value_refs = self.critic.scatter("values", batch) if self.critic is not None else None
        out = {"ref_logprobs": gather(ref_refs, self.pad_id)}
        if value_refs is not None:
            out["values"] = gather(value_refs, self.pad_id)
        reward_parts = ray.get(reward_refs)
        for warning in (w for _, warnings in reward_parts for w in warnings):
            log.warning("%s", warning)
        out.update(concat_batches([scores for scores, _ in reward_parts], self.pad_id))
        out["reward_fn_errors"] = torch.tensor(sum(len(warnings) for _, warnings in reward_parts))
        return out

    def _advantages(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Adjust the scores (whitening, clipping, missing-EOS penalty), fold the KL penalty in and compute
        advantages (GAE, or GRPO's group-relative scores) in place."""
        cfg, mask = self.cfg, batch["response_mask"].float()
        responses = batch["sequences"][:, -mask.shape[1]:]
        ended = algos.has_eos(responses, mask, self.eos_id)
        scores = algos.adjust_scores(batch["scores"], ended, missing_eos_penalty=cfg.missing_eos_penalty,
                                     whiten=cfg.whiten_scores, clip=cfg.score_clip)
        coef = self.kl_ctl.value if cfg.kl_mode == "reward" else 0.0
        stats = {"truncated_frac": (~ended).float().mean().item(), "score_mean": scores.mean().item()}
        if "logprobs" in batch:
            kl = algos.kl_estimate(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask
            stats.update(kl=kl.sum(-1).mean().item(), kl_per_token=algos.masked_mean(kl, mask).item())
        else:  # single update (kl_mode loss): no rollout log-probs; the policy measures the KL as it trains
            kl = torch.zeros_like(mask)
        if self.grpo:
            adv = algos.grpo_advantages(scores - coef * kl.sum(-1), cfg.group_size).unsqueeze(-1) * mask
        else:
            rewards = algos.shape_rewards(scores, kl, mask, coef)
            adv, batch["returns"] = algos.gae(rewards, batch["values"] * mask, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = algos.masked_whiten(adv, mask)
        batch["advantages"] = adv
        return stats

    def _train(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        kl_coef = self.kl_ctl.value if self.cfg.kl_mode == "loss" else 0.0
        keys = ["sequences", "attention_mask", "response_mask", "logprobs", "advantages", "ref_logprobs"]
        policy_refs = self.policy.scatter("train", {k: batch[k] for k in keys if k in batch}, kl_coef=kl_coef)
        critic_refs = None
        if self.critic is not None:  # policy and critic train at once
            keys = ["sequences", "attention_mask", "response_mask", "values", "returns"]
            critic_refs = self.critic.scatter("train", {k: batch[k] for k in keys})
        stats = mean_stats(policy_refs)  # shards are equal: the mean of replica means is the batch mean
        kl_tokens, tokens = stats.pop("kl_token_sum", None), stats.pop("response_tokens", None)
        if "logprobs" not in batch:  # the KL to the reference, measured by the update's forward (before it steps)
            stats["kl_per_token"] = kl_tokens / tokens
        else:
            stats.pop("kl", None)  # measured by the driver from the rollout log-probs
        return {**stats, **(mean_stats(critic_refs) if critic_refs is not None else {})}

    def step(self, prompts: list[list[int]], next_prompts: list[list[int]] | None = None) -> dict[str, float]:
        """One PPO iteration on ``prompts`` (already repeated ``group_size`` times for GRPO); with
        ``async_rollout``, ``next_prompts`` (the next iteration's) are sampled while this one trains."""
        t0 = time.perf_counter()
        batch = self._generate(prompts, next_prompts)
        t1 = time.perf_counter()
        batch.update(self._score(batch))
        t2 = time.perf_counter()
        kl_stats = self._advantages(batch)
        train_stats = self._train(batch)
        kl_stats.update({k: train_stats.pop(k) for k in ("kl", "kl_per_token") if k in train_stats})
        t3 = time.perf_counter()
        if self.rollout_engine is not None:
            self.rollout_engine.sync_weights(self.policy)
        if self.hf_engine is not None:  # async: queued behind the next batch's sampling, not waited for
            self.hf_engine.sync_weights(self.policy, wait=not self.cfg.async_rollout)
        t4 = time.perf_counter()
        scores, lengths = batch["scores"], batch["response_mask"].sum(-1).float()
        parts = {k: batch[k].mean().item() for k in batch if k == "reward_model" or k.startswith("reward/")}
        if self.cfg.reward_functions:
            parts["reward_fn_errors"] = int(batch["reward_fn_errors"])
        kl_coef = self.kl_ctl.value  # the coefficient this batch was shaped with; update() sets the next one
        self.kl_ctl.update(kl_stats["kl"], len(prompts))
        return {"reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
                **parts, **kl_stats, **train_stats, "kl_coef": kl_coef,
                **({"kl_target": self.kl_ctl.target} if self.kl_ctl.target is not None else {}),
                "response_len": lengths.mean().item(), "samples_per_s": len(prompts) / (t4 - t0),
                "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "time_sync": t4 - t3}

    # --- state ---------------------------------------------------------------------------------------------
    def checksums(self) -> dict[str, list[float]]:
        import ray

        groups = {"policy": self.policy, "reference": self.reference, "reward": self.reward, "critic": self.critic}
        return {name: ray.get(g.call("param_checksum")) for name, g in groups.items() if g is not None}

    def save(self, path: Path, tag: str) -> None:
        import ray

        for name, group in (("policy", self.policy), ("critic", self.critic)):
            if group is not None:
                ray.get(group.call("save_checkpoint", str(path / name), tag))

    def load(self, path: Path, tag: str) -> None:
        import ray

        for name, group in (("policy", self.policy), ("critic", self.critic)):
            if group is not None:
                ray.get(group.call("load_checkpoint", str(path / name), tag))
        if self.hf_engine is not None:  # the engines sample with the restored weights; nothing sampled before
            self._pending = None
            self.hf_engine.sync_weights(self.policy, wait=True)

    def export(self, out_dir: Path, card=None) -> None:
        import ray

        ray.get(self.policy.call("export", str(out_dir), card))

    def kl_state(self) -> dict:
        return asdict(self.kl_ctl)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in (self.policy, self.reference, self.reward, self.critic):
            if group is not None:
                group.kill()
        for engine in (self.rollout_engine, self.hf_engine):
            if engine is not None:
                engine.shutdown()
        for pg in {id(p.pg): p.pg for p in self.placements.values()}.values():
            remove_placement_group(pg)
