"""vLLM rollout engines (GPU recipes, ``ppo.rollout_engine: vllm``): separate actors that sample responses, with
the policy's weights pushed to them after every update in ONE call per engine (the whole state dict goes
through the object store once, never one remote call per tensor).

Not exercised on the CPU test machine (vLLM is not installed there); ``require_vllm`` makes the recipe fail
early with a clear message instead.
"""
from __future__ import annotations

import torch

from actors.group import gather
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
    def __init__(self, model_dir: str, tensor_parallel: int, seed: int):
        require_vllm()
        from vllm import LLM

        self.llm = LLM(model=model_dir, tensor_parallel_size=tensor_parallel, seed=seed,
                       worker_extension_cls=f"{__name__}.WeightLoader")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float
                 ) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("load_state_dict", args=(state_dict,))


class VLLMRollout:
    """Driver-side handle: shards prompts over the engines; old log-probs still come from the policy."""

    def __init__(self, cfg, model_dir: str):
        import ray

        require_vllm()
        self.cfg = cfg
        engine_cls = ray.remote(num_gpus=cfg.vllm_tensor_parallel)(VLLMEngineActor)
        self.engines = [engine_cls.remote(str(model_dir), cfg.vllm_tensor_parallel, i)
                        for i in range(cfg.vllm_engines)]

    def generate(self, prompts: dict[str, torch.Tensor], policy) -> dict[str, torch.Tensor]:
        import ray

        ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
        prompt_lists = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        bounds = [len(prompt_lists) * i // len(self.engines) for i in range(len(self.engines) + 1)]
        refs = [e.generate.remote(prompt_lists[bounds[i]:bounds[i + 1]], self.cfg.max_new_tokens,
                                  self.cfg.temperature, self.cfg.top_p) for i, e in enumerate(self.engines)]
        responses = [r for part in ray.get(refs) for r in part]
        width = max(len(r) for r in responses)
        pad_id, eos_id = ray.get(policy.actors[0].special_ids.remote())
        resp = torch.full((len(responses), width), pad_id, dtype=torch.long)
        for i, r in enumerate(responses):
            resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        resp_mask = response_mask(resp, eos_id) * (resp != pad_id).long()
        batch = {"sequences": torch.cat([ids, resp.masked_fill(resp_mask == 0, pad_id)], 1),
                 "attention_mask": torch.cat([mask, resp_mask], 1), "response_mask": resp_mask}
        batch["logprobs"] = gather(policy.scatter("rollout_logprobs", batch), pad_id)
        return batch

    def sync_weights(self, policy) -> None:
        import ray

        state_ref = policy.actors[0].state_dict_for_sync.remote()  # one put, shared by every engine
        ray.get([e.update_weights.remote(state_ref) for e in self.engines])

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            ray.kill(e)
