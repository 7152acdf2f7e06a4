"""Sequence log-probs of preference pairs under a frozen model, computed by Ray actors on the cluster: the
reference pass before DPO training (once; the numbers travel with the pairs) and the held-out pass after it.

The actors are PPO's ``ReferenceActor`` (a frozen causal LM returning per-token log-probs of a rollout-shaped
batch) in their own placement group; they are gone again before Ray Train asks for the workers' CPUs.
"""
from __future__ import annotations

import logging

from actors import algos
from actors.dpo.data import EncodedPair, preference_batch
from actors.group import ActorGroup, gather, role_placement, wait_ready
from actors.ppo.roles import ReferenceActor
from actors.ppo.rollout import split_batch
from cluster.schemas.rlhf import RoleConfig

log = logging.getLogger("raylm")


def pair_logps(model_dir: str, rows: list[EncodedPair], role: RoleConfig, *, batch_size: int, pad_id: int,
               name: str = "reference") -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) per pair under the model in ``model_dir``."""
    from ray.util.placement_group import remove_placement_group

    plan = role_placement("reference", role, f"raylm-dpo-{name}")
    wait_ready(plan)
    group = ActorGroup(ReferenceActor, plan["reference"], lambda rank, n: ((model_dir, {"temperature": 1.0}), {}),
                       name)
    try:
        # Every batch is queued before the first result is awaited: the actors never wait on the driver.
        step = batch_size * len(group)
        pending = []
        for start in range(0, len(rows), step):
            batch = preference_batch(rows[start:start + step], pad_id)
            # A short last batch goes to fewer replicas: none of them gets an empty shard.
            shards = split_batch(batch, min(len(group), batch["sequences"].shape[0]))
            refs = [actor.logprobs.remote(shard) for actor, shard in zip(group.actors, shards)]
            pending.append((batch["response_mask"], refs))
        out: list[tuple[float, float]] = []
        for mask, refs in pending:
            logprobs = gather(refs, pad_id)
            sums = algos.masked_sum(logprobs, mask.to(logprobs.dtype), dim=-1)
            half = sums.shape[0] // 2
            out += list(zip(sums[:half].tolist(), sums[half:].tolist()))
        return out
    finally:
        group.kill()
        remove_placement_group(plan["reference"].pg)
