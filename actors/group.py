"""Actor groups over placement groups (the launcher shape of OpenRLHF: one group per role, N replicas).

Each role gets a placement group with one bundle per replica. Colocated roles (reference with policy, reward
with critic) share one placement group: each bundle holds the larger of the two roles' needs and each of the
two actors placed in it asks for half, so both processes land on the same node/GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actors.ppo.rollout import concat_batches, split_batch
from cluster.schemas.rlhf import PPOConfig, RoleConfig


@dataclass
class Placement:
    """Where a role's replicas go: bundle ``bundle_indices[i]`` of ``pg`` with ``fraction`` of its resources."""

    pg: Any
    bundle_indices: list[int]
    num_cpus: float
    num_gpus: float


def _bundle(roles: list[RoleConfig]) -> dict[str, float]:
    bundle = {"CPU": max(r.num_cpus for r in roles)}
    gpus = max(r.num_gpus for r in roles)
    if gpus:
        bundle["GPU"] = gpus
    return bundle


def _shared_placement(roles: dict[str, RoleConfig], name: str) -> dict[str, Placement]:
    from ray.util.placement_group import placement_group

    bundle = _bundle(list(roles.values()))
    n = max(r.replicas for r in roles.values())
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK", name=name)
    share = 1.0 / len(roles)
    return {role: Placement(pg, list(range(cfg.replicas)), bundle["CPU"] * share, bundle.get("GPU", 0) * share)
            for role, cfg in roles.items()}


def role_config(cfg: PPOConfig, role: str) -> RoleConfig:
    if role == "vllm":  # rollout engines: one bundle of vllm_tensor_parallel GPUs per engine
        return RoleConfig(replicas=cfg.vllm_engines, num_cpus=1, num_gpus=cfg.vllm_tensor_parallel)
    return getattr(cfg, role)


def plan_placement(cfg: PPOConfig, roles: tuple[str, ...]) -> dict[str, Placement]:
    """Placement groups for ``roles`` (a subset of policy/critic/reward/reference/vllm), honouring colocation."""
    groups: list[dict[str, RoleConfig]] = []
    pending = list(roles)
    for a, b, on in (("policy", "reference", cfg.colocate_reference_with_policy),
                     ("critic", "reward", cfg.colocate_reward_with_critic)):
        if on and a in pending and b in pending:
            groups.append({a: getattr(cfg, a), b: getattr(cfg, b)})
            pending.remove(a)
            pending.remove(b)
    groups += [{r: role_config(cfg, r)} for r in pending]
    plan: dict[str, Placement] = {}
    for group in groups:
        plan.update(_shared_placement(group, "raylm-ppo-" + "+".join(group)))
    return plan


def role_placement(role: str, cfg: RoleConfig, name: str) -> dict[str, Placement]:
    """One placement group for a single role outside PPO (e.g. DPO's reference actors)."""
    return _shared_placement({role: cfg}, name)


def wait_ready(plan: dict[str, Placement], timeout_s: float = 120.0) -> None:
    """Block until every placement group is reserved; a clear error if the cluster cannot fit them."""
    import ray

    pgs = {id(p.pg): (role, p.pg) for role, p in plan.items()}
    ready, _ = ray.wait([pg.ready() for _, pg in pgs.values()], num_returns=len(pgs), timeout=timeout_s)
    if len(ready) < len(pgs):
        wanted = {role: pg.bundle_specs for role, pg in pgs.values()}
        raise RuntimeError(f"ppo: the Ray cluster could not reserve the role resources {wanted} within "
                           f"{timeout_s:.0f}s (available: {ray.available_resources()}); lower ppo.<role>.num_cpus/"
                           f"num_gpus or turn on colocation")


class ActorGroup:
    """N replicas of one role, each a Ray actor pinned to its placement-group bundle."""

    def __init__(self, actor_cls: type, placement: Placement, make_args, name: str):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote_cls = ray.remote(actor_cls)
        self.name = name
        self.actors = []
        for rank, bundle in enumerate(placement.bundle_indices):
            strategy = PlacementGroupSchedulingStrategy(placement.pg, placement_group_bundle_index=bundle)
            args, kwargs = make_args(rank, len(placement.bundle_indices))
            self.actors.append(remote_cls.options(
                num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, scheduling_strategy=strategy,
                name=None, max_concurrency=1).remote(*args, **kwargs))

    def __len__(self) -> int:
        return len(self.actors)

    def setup_distributed(self) -> None:
        """Rendezvous the replicas into one torch.distributed group and build their engines (concurrently)."""
        import ray

        addr, port = ray.get(self.actors[0].master_address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])

    def call(self, method: str, *args, **kwargs) -> list:
        """The same call on every replica; returns object refs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def map(self, method: str, shards: list, **kwargs) -> list:
        """Replica i gets ``shards[i]``; returns object refs."""
        if len(shards) != len(self.actors):
            raise ValueError(f"{self.name}: {len(shards)} shards for {len(self.actors)} replicas")
        return [getattr(a, method).remote(s, **kwargs) for a, s in zip(self.actors, shards)]

    def scatter(self, method: str, batch: dict[str, torch.Tensor], **kwargs) -> list:
        """Row shards of ``batch`` in order, replica i gets shard i; returns object refs (for ``gather``)."""
        return self.map(method, split_batch(batch, len(self)), **kwargs)

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def gather(refs: list, pad_id: int):
    """Wait for shard results and concatenate them in order: dicts of tensors -> one dict (length dims right-
    padded with ``pad_id``/0), bare tensors -> one tensor."""
    import ray

    parts = ray.get(refs)
    if isinstance(parts[0], torch.Tensor):
        return concat_batches([{"_": p} for p in parts], pad_id)["_"]
    return concat_batches(parts, pad_id)


def mean_stats(refs: list) -> dict[str, float]:
    """Wait for per-replica stats dicts and average them key by key."""
    import ray

    parts = ray.get(refs)
    return {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}
