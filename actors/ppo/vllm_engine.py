"""vLLM rollout engines (GPU recipes, ``ppo.rollout_engine: vllm``): separate actors that sample responses, with
the policy's weights pushed to them after every update in ONE call per engine (the whole state dict goes
through the object store once, never one remote call per tensor).

Not exercised on the CPU test machine (vLLM is not installed there); ``require_vllm`` makes the recipe fail
early with a clear message instead.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from actors.group import ActorGroup, gather
from actors.ppo.rollout import response_mask


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("ppo.rollout_engine: 'vllm' needs the vllm package, which is not installed (it is a GPU "
                           "option: `pip install vllm` on the GPU nodes); use ppo.rollout_engine=hf on CPU") from None


class WeightLoader:
    """vLLM worker extension (``worker_extension_cls``): load a full state dict into the running model."""

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model_runner.model.load_weights(weights=list(state_dict.items()))


class VLLMEngineActor:
    """One vLLM engine (``tensor_parallel`` GPUs of its placement-group bundle): samples responses to a shard of
    left-padded prompts and returns them as rollout tensors, like ``PolicyActor.generate`` (minus log-probs)."""

    def __init__(self, model_dir: str, tensor_parallel: int, seed: int, sampling: dict, pad_id: int, eos_id: int):
        require_vllm()
        from vllm import LLM

        self.sampling, self.pad_id, self.eos_id = sampling, pad_id, eos_id
        # With tensor parallelism the engine's workers are local processes over the GPUs Ray gave this actor
        # (its bundle holds all of them), not Ray actors that would need bundles of their own.
        backend = {"distributed_executor_backend": "mp"} if tensor_parallel > 1 else {}
        self.llm = LLM(model=model_dir, tensor_parallel_size=tensor_parallel, seed=seed,
                       worker_extension_cls=f"{__name__}.WeightLoader", **backend)

    def generate(self, prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from vllm import SamplingParams, TokensPrompt

        s = self.sampling
        params = SamplingParams(max_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                min_tokens=0 if s["stop_at_eos"] else s["max_new_tokens"])
        ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
        token_prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(ids, mask)]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        responses = [torch.tensor(list(o.outputs[0].token_ids), dtype=torch.long) for o in outputs]
        resp = pad_sequence(responses, batch_first=True, padding_value=self.pad_id)
        generated = pad_sequence([torch.ones_like(r) for r in responses], batch_first=True, padding_value=0)
        resp_mask = response_mask(resp, self.eos_id) * generated
        return {"sequences": torch.cat([ids, resp.masked_fill(resp_mask == 0, self.pad_id)], 1),
                "attention_mask": torch.cat([mask, resp_mask], 1), "response_mask": resp_mask}

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("load_state_dict", args=(state_dict,))


class VLLMRollout:
    """Driver-side handle: the engines as one ``ActorGroup`` in their own placement group (one bundle per
    engine, planned with the other roles); old log-probs still come from the policy."""

    def __init__(self, cfg, model_dir: str, placement, pad_id: int, eos_id: int):
        require_vllm()
        self.pad_id = pad_id
        sampling = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "stop_at_eos")}
        self.engines = ActorGroup(VLLMEngineActor, placement, lambda r, n: (
            (str(model_dir), cfg.vllm_tensor_parallel, r, sampling, pad_id, eos_id), {}), "vllm")

    def generate(self, prompts: dict[str, torch.Tensor], policy) -> dict[str, torch.Tensor]:
        batch = gather(self.engines.scatter("generate", prompts), self.pad_id)
        batch["logprobs"] = gather(policy.scatter("rollout_logprobs", batch), self.pad_id)
        return batch

    def sync_weights(self, policy) -> None:
        import ray

        state_ref = policy.actors[0].state_dict_for_sync.remote()  # one put, shared by every engine
        ray.get(self.engines.call("update_weights", state_ref))

    def shutdown(self) -> None:
        self.engines.kill()
