"""Transformers rollout engines (``ppo.rollout_engine: hf_engine``): separate actors, each with a copy of the
policy's weights, that sample responses (``actors.ppo.decode``: KV cache) while the policy trains.

What they buy is overlap: with ``ppo.async_rollout`` the next batch is sampled during the current update
(one-step off-policy, as OpenRLHF's async mode and verl's one-step-off recipe), so generation and training run
on different cores or GPUs at once. The weights are pushed after every update in one call per engine (the
state dict goes through the object store once), queued behind the generation already running, so every
batch is sampled by the weights of exactly one update before the one it trains.
"""
from __future__ import annotations

import torch

from actors.group import ActorGroup, gather
from actors.ppo import decode, rollout


class HFEngineActor:
    """One engine: samples a shard of left-padded prompts like ``PolicyActor.generate`` and, when asked, the
    log-probs of its samples under its own weights (the behaviour policy's: the PPO ratio's denominator)."""

    def __init__(self, model_dir: str, sampling: dict, pad_id: int, eos_id: int, seed: int):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)  # as the policy replica of the same rank: the same samples from the same weights
        self.sampling, self.pad_id, self.eos_id = sampling, pad_id, eos_id
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # load_state_dict copies into the same parameters: the compiled step needs no recompile per push.
        self.decode_step = decode.compile_step(self.model) if sampling["compile_decode"] else None

    def generate(self, prompts: dict[str, torch.Tensor], with_logprobs: bool) -> dict[str, torch.Tensor]:
        s = self.sampling
        out = rollout.generate(self.model, prompts["prompt_ids"].to(self.device),
                               prompts["prompt_mask"].to(self.device), pad_id=self.pad_id, eos_id=self.eos_id,
                               max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                               stop_at_eos=s["stop_at_eos"], with_logprobs=with_logprobs, step=self.decode_step)
        return {k: v.cpu() for k, v in out.items()}

    def update_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})


class HFRollout:
    """Driver-side handle: the engines as one ``ActorGroup`` in their own placement group (``ppo.rollout``).
    ``submit`` returns at once (object refs); ``collect`` waits for them."""

    def __init__(self, cfg, model_dir: str, placement, pad_id: int, eos_id: int, seed: int):
        self.pad_id = pad_id
        # Behaviour log-probs: needed unless the update may take its own (on-policy, one update per batch).
        self.with_logprobs = cfg.async_rollout or not cfg.single_update
        sampling = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "stop_at_eos", "compile_decode")}
        self.engines = ActorGroup(HFEngineActor, placement, lambda r, n: (
            (str(model_dir), sampling, pad_id, eos_id, seed + r), {}), "rollout")
        self.pending_sync: list = []

    def submit(self, prompts: dict[str, torch.Tensor]) -> list:
        return self.engines.scatter("generate", prompts, with_logprobs=self.with_logprobs)

    def collect(self, refs: list) -> dict[str, torch.Tensor]:
        return gather(refs, self.pad_id)

    def sync_weights(self, policy, wait: bool) -> None:
        """Queue the policy's new weights on every engine (behind any generation already submitted)."""
        import ray

        ray.get(self.pending_sync)  # the previous push: surfaces its errors, never piles pushes up
        state_ref = policy.actors[0].state_dict_for_sync.remote(as_numpy=True)  # one put for every engine
        self.pending_sync = self.engines.call("update_weights", state_ref)
        if wait:
            ray.get(self.pending_sync)
            self.pending_sync = []

    def shutdown(self) -> None:
        self.engines.kill()
