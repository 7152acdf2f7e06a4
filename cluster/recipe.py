"""The whole recipe: one section per stage, loaded from YAML plus dotted overrides, validated before Ray starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from cluster.config import ConfigError, apply_overrides, atomic_write_text, from_dict, read_yaml, to_dict
from cluster.schemas.data import DataConfig
from cluster.schemas.eval import EvalConfig
from cluster.schemas.model import ModelConfig, TokenizerConfig
from cluster.schemas.rlhf import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from cluster.schemas.serve import ServeConfig
from cluster.schemas.train import PretrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = PROJECT_ROOT / "configs" / "tiny-cpu.yaml"


@dataclass(kw_only=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS, else start a local cluster
    num_cpus: int | None = None  # local cluster size; None: the machine's cores
    num_gpus: int | None = None
    object_store_memory_mb: int | None = None
    # Serve's HTTP ingress on the clusters raylm starts: "haproxy", Ray Serve's HAProxy ingress (HAProxy forwards
    # each request to a replica, which serves it itself: 1.7x the tokens/s of Serve's Python proxy at c16,
    # docs/serving.md), "proxy", Serve's Python proxy, or "auto": HAProxy on the KubeRay pods, Serve's proxy on a
    # local cluster, because HAProxy's stats page and exporter listen on all interfaces whatever serve.host says
    # (Ray's template has no host for them), and a local cluster listens on loopback only. An exported
    # RAY_SERVE_ENABLE_HA_PROXY (0 or 1) wins over this for a local cluster.
    serve_ingress: Literal["auto", "haproxy", "proxy"] = "auto"


@dataclass(kw_only=True)
class Recipe:
    name: str
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # what `raylm run` aligns the SFT model with: ppo (reward + ppo stages; GRPO is ppo.algorithm=grpo) or dpo
    alignment: Literal["ppo", "dpo"] = "ppo"
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        # The name is a directory (runs/<name>): it must not climb out of runs/ or nest.
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name: must be a plain folder name (not '.' or '..', no '/', '\\' or NUL), "
                             f"got {self.name!r}")
        if self.data.tokenize.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.tokenize.seq_len: {self.data.tokenize.seq_len} exceeds "
                             f"model.max_seq_len={self.model.max_seq_len}")
        if self.pretrain.pipeline_stages > self.model.n_layers:
            raise ValueError(f"pretrain.pipeline_stages: {self.pretrain.pipeline_stages} stages for "
                             f"{self.model.n_layers} layers")

    def to_dict(self) -> dict:
        return to_dict(self)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load ``path`` (default ``configs/tiny-cpu.yaml``), apply ``a.b=c`` overrides, validate everything."""
    path = Path(path) if path else DEFAULT_RECIPE
    data = apply_overrides(read_yaml(path), list(overrides or []))
    data.setdefault("name", path.stem)
    try:
        return from_dict(Recipe, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a recipe that was saved (e.g. shipped to a Ray worker as a dict)."""
    return from_dict(Recipe, data)


def save_resolved(recipe: Recipe, run_dir) -> Path:
    from cluster.storage import location

    out = location(run_dir) / "config.yaml"
    atomic_write_text(out, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return out
