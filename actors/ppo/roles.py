"""The four PPO roles as Ray actor classes (each in its own process; see ``actors.group`` for placement).

Trainable roles (policy, critic) hold a DeepSpeed engine; their replicas form one torch.distributed group
(gloo on CPU, NCCL on GPU) and are data parallel: each trains on its shard and DeepSpeed averages gradients.
Frozen roles (reward, reference) are plain eval-mode transformers models; their replicas score shards
independently.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from actors import algos
from actors.ppo import decode, rollout

Batch = dict[str, torch.Tensor]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _cpu(batch: Batch) -> Batch:
    return {k: v.detach().cpu() for k, v in batch.items()}


def _mean(values: list[float]) -> float:
    return float(sum(values) / max(len(values), 1))


class _TrainableRole:
    """DeepSpeed engine over one model, one rank of a data-parallel group."""

    def __init__(self, model_dir: str, cfg: dict[str, Any], rank: int, world_size: int, seed: int):
        self.model_dir, self.cfg, self.rank, self.world_size = model_dir, cfg, rank, world_size
        self.seed = seed
        self.engine = None

    def master_address(self) -> tuple[str, int]:
        """This replica's address and a free port: rank 0 hosts the group's torch.distributed rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        import deepspeed

        from pipelines.train.builder import initialize
        from pipelines.train.ds_config import deepspeed_config
        from pipelines.train.shm import skip_cpu_shm_comm_build

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        torch.manual_seed(self.seed + self.rank)
        model = self.load_model().to(_device())
        cfg = self.cfg
        # The training stages' builder: the same DeepSpeed config derivation and client AdamW; a constant LR.
        ds_config = deepspeed_config(micro_batch_size=cfg["micro_batch_size"], data_parallel=self.world_size,
                                     grad_accum=cfg["grad_accum"], grad_clip=cfg["grad_clip"],
                                     zero_stage=cfg["zero_stage"],
                                     precision=cfg["precision"], on_gpu=torch.cuda.is_available())
        self.engine = initialize(model, ds_config, lr=cfg["lr"], weight_decay=0.0, on_gpu=torch.cuda.is_available())
        # Compiled at its first call; the critic never samples.
        self.decode_step = decode.compile_step(self.engine.module) if cfg.get("compile_decode") else None

    def load_model(self):
        raise NotImplementedError

    def param_checksum(self) -> float:
        """Sum of |w| over all weights: lets tests see that training changed (or did not change) a model."""
        return float(sum(p.detach().abs().sum().item() for p in self.engine.module.parameters()))

    def save_checkpoint(self, path: str, tag: str) -> None:
        # Every rank writes its ZeRO shard; the sampling RNG rides along so a resumed run draws the same tokens.
        self.engine.save_checkpoint(path, tag=tag, client_state={"rng": torch.get_rng_state()})

    def load_checkpoint(self, path: str, tag: str) -> None:
        from pipelines.train.checkpoint import weights_only_loads

        with weights_only_loads():  # a file planted in the run directory cannot run code here
            load_path, client_state = self.engine.load_checkpoint(path, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"ppo checkpoint: nothing to load at {path}/{tag}")
        torch.set_rng_state(client_state["rng"])

    def export(self, out_dir: str, card=None) -> None:
        """Write the model in the Hugging Face format with its model card (``card``: a
        ``pipelines.model_card.CardInfo``), atomically (rank 0; weights are whole under ZeRO 0-2)."""
        from pipelines.hf_export import staged_directory
        from pipelines.hf_models import load_tokenizer
        from pipelines.model_card import write_model_card

        if self.rank == 0:
            with staged_directory(out_dir) as tmp:
                self.engine.module.save_pretrained(tmp)
                load_tokenizer(self.model_dir).save_pretrained(tmp)
                write_model_card(tmp, card)


class PolicyActor(_TrainableRole):
    """The trainable policy: samples rollouts (``actors.ppo.decode``) and takes clipped PPO steps."""

    def load_model(self):
        from transformers import AutoModelForCausalLM

        from pipelines.hf_models import load_tokenizer

        tokenizer = load_tokenizer(self.model_dir)  # the pad and chat-template fallbacks every stage uses
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        return AutoModelForCausalLM.from_pretrained(self.model_dir)

    def generate(self, prompts: Batch) -> Batch:
        """Sample responses to left-padded ``prompt_ids``/``prompt_mask`` with their log-probs under this
        (pre-update) policy, the PPO "old" log-probs, kept from the sampling steps (not with ``single_update``:
        the update computes them)."""
        cfg, model = self.cfg, self.engine.module
        prompts = _to(prompts, _device())
        out = rollout.generate(model, prompts["prompt_ids"], prompts["prompt_mask"], pad_id=self.pad_id,
                               eos_id=self.eos_id, max_new_tokens=cfg["max_new_tokens"],
                               temperature=cfg["temperature"], top_p=cfg["top_p"],
                               stop_at_eos=cfg["stop_at_eos"], with_logprobs=not cfg["single_update"],
                               step=self.decode_step)
        return _cpu(out)

    def special_ids(self) -> tuple[int, int]:
        return self.pad_id, self.eos_id

    def rollout_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs of responses sampled elsewhere (vLLM engines) under this policy."""
        model = self.engine.module
        model.eval()
        with torch.no_grad():
            logprobs, _ = rollout.response_logprobs(model, _to(batch, _device()), self.cfg["temperature"])
        model.train()
        return logprobs.cpu()

    def train(self, batch: Batch, kl_coef: float = 0.0) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped-surrogate steps over this replica's shard: backward per micro-batch,
        an optimizer step every ``grad_accum`` of them (DeepSpeed counts the micro-steps). Without rollout
        log-probs in ``batch`` (``single_update``) the old log-probs are this pass's own, detached: the ratio is
        1 and its gradient the policy gradient, as in TRL's GRPO with one update per batch. With the KL in the
        loss, also the first pass's KL to the reference: the batch's KL before this update."""
        cfg, stats = self.cfg, {"policy_loss": [], "clip_frac": [], "approx_kl": [], "entropy": []}
        kl_seq, kl_tokens, tokens = [], 0.0, 0.0
        self.engine.train()
        for epoch in range(cfg["ppo_epochs"]):
            for mb in rollout.micro_batches(_to(batch, self.engine.device), cfg["micro_batch_size"]):
                mask = mb["response_mask"].float()
                logprobs, entropy = rollout.response_logprobs(self.engine, mb, cfg["temperature"], with_entropy=True)
                old = mb["logprobs"] if "logprobs" in mb else logprobs.detach()
                loss, s = algos.policy_loss(logprobs, old, mb["advantages"], mask, cfg["clip_eps"])
                if cfg["kl_mode"] == "loss":  # KL to the reference as a loss term instead of a reward penalty
                    kl = algos.kl_estimate(logprobs, mb["ref_logprobs"], cfg["kl_estimator"])
                    loss = loss + kl_coef * algos.masked_mean(kl, mask)
                    if epoch == 0:
                        masked_kl = kl.detach() * mask
                        kl_seq += masked_kl.sum(-1).tolist()
                        kl_tokens, tokens = kl_tokens + masked_kl.sum().item(), tokens + mask.sum().item()
                self.engine.backward(loss)
                self.engine.step()
                stats["policy_loss"].append(loss.item())
                stats["clip_frac"].append(s["clip_frac"].item())
                stats["approx_kl"].append(s["approx_kl"].item())
                stats["entropy"].append(algos.masked_mean(entropy.detach(), mask).item())
        out = {k: _mean(v) for k, v in stats.items()}
        if kl_seq:
            out.update(kl=_mean(kl_seq), kl_token_sum=kl_tokens, response_tokens=tokens)
        return out

    def state_dict_for_sync(self, as_numpy: bool = False) -> dict[str, Any]:
        """All weights in one dict (one object-store put) for rollout engines outside this process. ``as_numpy``:
        numpy arrays where the dtype allows, which Ray stores without pickling (measured with the benchmark's
        tiny policy on a busy 2-core machine: the put of torch tensors held this actor ~160 ms per push)."""
        state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
        if as_numpy:
            state = {k: v.numpy() if v.dtype != torch.bfloat16 else v for k, v in state.items()}
        return state


class CriticActor(_TrainableRole):
    """The trainable value model, initialised from the reward model (same body + scalar head), or from the
    policy's body and a fresh head when there is no reward model (function rewards only)."""

    def load_model(self):
        from transformers import AutoConfig

        from pipelines.hf_models import init_reward_model, load_reward_model

        architectures = AutoConfig.from_pretrained(self.model_dir).architectures or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return load_reward_model(self.model_dir)
        return init_reward_model(self.model_dir)

    def values(self, batch: Batch) -> torch.Tensor:
        self.engine.module.eval()
        with torch.no_grad():
            values = rollout.response_values(self.engine.module, _to(batch, _device()))
        self.engine.module.train()
        return values.cpu()

    def train(self, batch: Batch) -> dict[str, float]:
        cfg, stats = self.cfg, {"value_loss": [], "vf_clip_frac": []}
        self.engine.train()
        for _ in range(cfg["ppo_epochs"]):
            for mb in rollout.micro_batches(_to(batch, self.engine.device), cfg["micro_batch_size"]):
                values = rollout.response_values(self.engine.module, mb)
                loss, s = algos.value_loss(values, mb["values"], mb["returns"], mb["response_mask"].float(),
                                           cfg["value_clip_eps"])
                self.engine.backward(loss)
                self.engine.step()
                stats["value_loss"].append(loss.item())
                stats["vf_clip_frac"].append(s["vf_clip_frac"].item())
        return {k: _mean(v) for k, v in stats.items()}


class _FrozenRole:
    def __init__(self, model_dir: str, cfg: dict[str, Any]):
        self.model_dir, self.cfg = model_dir, cfg
        self.model = self.load_model().to(_device()).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def load_model(self):
        raise NotImplementedError

    def param_checksum(self) -> float:
        return float(sum(p.abs().sum().item() for p in self.model.parameters()))


class RewardActor:
    """The reward: the frozen reward model's score (one scalar per prompt + response), plus the weighted
    ``ppo.reward_functions`` over the decoded texts (``actors.ppo.reward_functions``), or the functions alone."""

    def __init__(self, model_dir: str | None, tokenizer_dir: str, cfg: dict[str, Any], functions: list):
        from pipelines.hf_models import load_reward_model

        self.cfg, self.functions = cfg, list(functions)
        self.model = None
        if model_dir is not None:
            self.model = load_reward_model(model_dir).to(_device()).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.tokenizer = None
        if self.functions:
            from pipelines.hf_models import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_dir)

    def param_checksum(self) -> float:
        return float(sum(p.abs().sum().item() for p in self.model.parameters())) if self.model is not None else 0.0

    def texts(self, batch: Batch) -> tuple[list[str], list[str]]:
        """Prompts and responses as strings, special tokens (chat markers, EOS, padding) dropped."""
        width = batch["response_mask"].shape[1]
        seq, attn = batch["sequences"], batch["attention_mask"].bool()
        decode = lambda ids: self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
        prompts = [decode(row[:-width][m[:-width]]) for row, m in zip(seq, attn)]
        responses = [decode(row[-width:][m[-width:]]) for row, m in zip(seq, attn)]
        return prompts, responses

    @torch.no_grad()
    def score(self, batch: Batch, first_index: int = 0) -> tuple[Batch, list[str]]:
        """{"scores": the total, "reward_model": its part, "reward/<fn>": each function's raw values} and the
        warnings of samples a function failed on (named by ``batch["index"]``, their place in the iteration, or
        counted from ``first_index`` for a shard sent straight from the actor that sampled it)."""
        from actors.ppo.reward_functions import evaluate
        from pipelines.reward.model import sequence_scores

        n = batch["sequences"].shape[0]
        if "index" not in batch:
            batch = {**batch, "index": torch.arange(first_index, first_index + n)}
        parts, warnings = {}, []
        total = torch.zeros(n)
        if self.model is not None:
            b = _to(batch, _device())
            parts["reward_model"] = sequence_scores(self.model, b["sequences"], b["attention_mask"]).float().cpu()
            total += parts["reward_model"]
        if self.functions:
            prompts, responses = self.texts(batch)
            for f in self.functions:
                values, errors = evaluate(f, prompts, responses, batch["index"].tolist())
                parts[f"reward/{f.name}"] = values
                total += f.weight * values
                warnings += errors
        return {"scores": total, **parts}, warnings


class ReferenceActor(_FrozenRole):
    """The frozen SFT model: per-token log-probs that the KL penalty is measured against."""

    def load_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir)

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        logprobs, _ = rollout.response_logprobs(self.model, _to(batch, _device()), self.cfg["temperature"])
        return logprobs.cpu()
