from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from cluster.schemas.train import TrainConfig


def _check_model_ref(value: str | None, key: str) -> None:
    """Shape only: whether transformers can load the model is checked by the stage before Ray starts."""
    if value is not None and not value.strip():
        raise ValueError(f"{key}: must name a model directory or hub id (or be null), got an empty string")


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    # A Hugging Face causal LM (directory or hub id) to start from; None: <run-dir>/pretrain/model.
    base_model: str | None = None
    data: str | None = None  # JSONL/parquet; None: Q/A pairs derived from the built-in corpus
    max_len: int = 256
    packing: bool = False
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_model_ref(self.base_model, "base_model")


@dataclass(kw_only=True)
class RewardConfig(TrainConfig):
    # A causal LM (directory or hub id) whose body gets the scalar head; None: <run-dir>/sft/model.
    base_model: str | None = None
    data: str | None = None  # prompt/chosen/rejected or HH transcripts; None: built-in pairs
    max_len: int = 256
    margin: float = 0.0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_model_ref(self.base_model, "base_model")


@dataclass(kw_only=True)
class RoleConfig:
    replicas: int = 1
    num_cpus: float = 1
    num_gpus: float = 0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """``raylm dpo``: the SFT model trained directly on preference pairs against itself, frozen, as reference."""

    data: str | None = None  # prompt/chosen/rejected or HH transcripts (as reward.data); None: built-in pairs
    max_len: int = 256  # prompt + reply tokens
    max_prompt_len: int = 128  # a longer prompt keeps its end (the turns nearest the reply)
    val_fraction: float = 0.1
    beta: float = 0.1  # strength of the implicit KL to the reference: smaller lets the policy move further
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid only: the share of pairs assumed mislabelled (conservative DPO)
    reference: RoleConfig = field(default_factory=RoleConfig)  # the actors computing reference log-probs
    reference_batch_size: int = 16  # pairs per reference forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing: applies to loss_type sigmoid only, got loss_type={self.loss_type}")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(f"max_prompt_len: must be in (0, max_len={self.max_len}), got {self.max_prompt_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.reference_batch_size < 1:
            raise ValueError(f"reference_batch_size: must be >= 1, got {self.reference_batch_size}")


@dataclass(frozen=True)
class RewardFunctionSpec:
    """One entry of ``ppo.reward_functions``: ``path/to/file.py:function`` or ``module:function``, optionally
    followed by ``*weight``."""

    source: str  # a .py file (relative to the working directory) or an importable module
    function: str
    weight: float = 1.0

    @property
    def is_file(self) -> bool:
        return self.source.endswith(".py")

    @classmethod
    def parse(cls, text: str, key: str = "ppo.reward_functions") -> RewardFunctionSpec:
        body, star, weight_text = text.rpartition("*") if "*" in text else (text, "", "")
        weight = 1.0
        if star:
            try:
                weight = float(weight_text)
                if not math.isfinite(weight):
                    raise ValueError
            except ValueError:
                raise ValueError(f"{key}: {text!r}: the weight after '*' must be a number, got {weight_text!r}"
                                 ) from None
        source, colon, function = body.rpartition(":")
        if not colon or not source or not function.isidentifier():
            raise ValueError(f"{key}: {text!r}: expected path/to/file.py:function or module:function "
                             f"(optionally *weight)")
        return cls(source=source, function=function, weight=weight)


@dataclass(kw_only=True)
class PPOConfig:
    algorithm: Literal["ppo", "grpo"] = "ppo"
    # The policy (and reference) to start from, a causal LM directory or hub id; None: <run-dir>/sft/model.
    policy_model: str | None = None
    prompts: str | None = None  # JSONL/parquet with `prompt`; None: built-in prompts
    iterations: int = 20
    rollout_batch_size: int = 16
    group_size: int = 4  # GRPO samples per prompt
    max_prompt_len: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0
    stop_at_eos: bool = True  # false: every response is max_new_tokens long (EOS suppressed; benchmarks)
    # torch.compile the sampling loop's one-token step (static KV cache): ~1.5x faster sampling of small models
    # on CPU, for seconds to a minute of compiling per actor at the first batch (and per new batch size).
    compile_decode: bool = False
    top_p: float = 1.0
    ppo_epochs: int = 1
    micro_batch_size: int = 8  # rows per forward/backward on each policy/critic replica
    # Samples per optimizer step over all replicas (micro-batches accumulate, TRL's gradient_accumulation_steps,
    # verl's ppo_mini_batch_size); None: one step per micro-batch on each replica (micro_batch_size x replicas).
    # = rollout_batch_size with ppo_epochs 1 and kl_mode loss: one update per batch, taken from the rollout's
    # own policy, so the rollout log-prob forward is skipped (old log-probs = the update's, detached).
    mini_batch_size: int | None = None
    actor_lr: float = 1e-5
    critic_lr: float = 5e-5
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_mode: Literal["reward", "loss"] = "reward"
    adaptive_kl: bool = True  # proportional control of kl_coef towards kl_target (algos.KLController)
    kl_target: float = 6.0  # nats per response (summed over its tokens), the mean over a batch
    kl_horizon: int = 10000  # samples; kl_coef moves by at most 20% per horizon
    kl_coef_min: float = 0.0  # a floor for the adapted kl_coef (0: the standard controller)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut at max_new_tokens
    whiten_scores: bool = False  # scores -> zero mean, unit std over each batch (before the KL penalty)
    score_clip: float | None = None  # clip scores (after whitening) to [-score_clip, score_clip]
    whiten_advantages: bool = True
    reward_functions: list[str] = field(default_factory=list)  # "file.py:fn", "module:fn", "...:fn*0.5"
    use_reward_model: bool = True  # false: the reward is the functions alone (no reward model is loaded)
    # hf: the policy replicas sample (actors.ppo.decode); hf_engine: separate actors with a copy of the
    # weights (``rollout``), pushed after every update; vllm: vLLM engines (GPU).
    rollout_engine: Literal["hf", "hf_engine", "vllm"] = "hf"
    # One-step off-policy (rollout_engine hf_engine): the next batch is sampled, by the weights before the
    # current update, while that update runs; the PPO ratio is taken against the sampling weights' log-probs.
    async_rollout: bool = False
    vllm_engines: int = 1  # rollout_engine=vllm: engine actors (GPU recipes only)
    vllm_tensor_parallel: int = 1
    zero_stage: int = 2  # policy/critic DeepSpeed ZeRO stage; 3 would partition the weights generate needs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0
    colocate_reference_with_policy: bool = True
    colocate_reward_with_critic: bool = True
    checkpoint_every: int = 10
    policy: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig = field(default_factory=RoleConfig)
    reward: RoleConfig = field(default_factory=RoleConfig)
    reference: RoleConfig = field(default_factory=RoleConfig)
    rollout: RoleConfig = field(default_factory=RoleConfig)  # rollout_engine hf_engine: the engine actors

    def __post_init__(self) -> None:
        for name in ("iterations", "rollout_batch_size", "max_prompt_len", "max_new_tokens", "ppo_epochs",
                     "micro_batch_size", "checkpoint_every", "kl_horizon", "vllm_engines", "vllm_tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("clip_eps", "value_clip_eps", "temperature", "kl_target", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("kl_coef", "kl_coef_min", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.score_clip is not None and self.score_clip <= 0:
            raise ValueError(f"score_clip: must be > 0 (or null: no clipping), got {self.score_clip}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage: must be 0, 1 or 2 (ZeRO-3 partitions the weights the policy generates "
                             f"with), got {self.zero_stage}")
        if self.algorithm == "grpo":
            if self.group_size < 2:
                raise ValueError(f"group_size: GRPO needs >= 2 samples per prompt, got {self.group_size}")
            if self.rollout_batch_size % self.group_size:
                raise ValueError(f"group_size: rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                                 f"group_size={self.group_size} for GRPO")
        _check_model_ref(self.policy_model, "policy_model")
        _ = self.reward_specs  # parses every entry: a bad one fails here, naming it
        if not self.use_reward_model and not self.reward_functions:
            raise ValueError("use_reward_model: false needs at least one entry in ppo.reward_functions")
        if self.async_rollout and self.rollout_engine != "hf_engine":
            raise ValueError(f"async_rollout: needs rollout_engine: hf_engine (engines apart from the policy, that "
                             f"sample while it trains), got rollout_engine: {self.rollout_engine}")
        for role in ("policy", "critic", "reward", "reference") + (("rollout",) if self.rollout_engine == "hf_engine"
                                                                   else ()):
            replicas = getattr(self, role).replicas
            if self.rollout_batch_size % replicas:
                raise ValueError(f"{role}.replicas: rollout_batch_size={self.rollout_batch_size} must split evenly "
                                 f"over {replicas} replicas")
        if self.mini_batch_size is not None:
            if self.mini_batch_size < 1 or self.rollout_batch_size % self.mini_batch_size:
                raise ValueError(f"mini_batch_size: must divide rollout_batch_size={self.rollout_batch_size}, got "
                                 f"{self.mini_batch_size}")
            for role in ("policy",) + (("critic",) if self.algorithm == "ppo" else ()):
                per_step = self.micro_batch_size * getattr(self, role).replicas
                if self.mini_batch_size % per_step:
                    raise ValueError(f"mini_batch_size: must be a multiple of micro_batch_size x {role}.replicas = "
                                     f"{per_step}, got {self.mini_batch_size}")

    def grad_accum(self, role: str) -> int:
        """Micro-batches each replica of ``role`` (policy/critic) accumulates into one optimizer step."""
        if self.mini_batch_size is None:
            return 1
        return self.mini_batch_size // (self.micro_batch_size * getattr(self, role).replicas)

    @property
    def single_update(self) -> bool:
        """One optimizer step per batch, from the policy that sampled it, with the KL in the loss: the old
        log-probs equal the update's own (detached), so no rollout log-prob forward is needed."""
        return (self.ppo_epochs == 1 and self.mini_batch_size == self.rollout_batch_size
                and self.kl_mode == "loss")

    @property
    def reward_specs(self) -> list[RewardFunctionSpec]:
        return [RewardFunctionSpec.parse(text, f"reward_functions[{i}]") for i, text in enumerate(self.reward_functions)]
