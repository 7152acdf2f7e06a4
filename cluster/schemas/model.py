from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class ModelConfig:
    """A LLaMA-style decoder. ``vocab_size`` comes from ``tokenizer.vocab_size`` (one source of truth)."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # RMSNorm of each query and key head before RoPE (OLMo 2, Qwen3, modded-nanogpt): exports as Qwen3.
    qk_norm: bool = False
    # The gated MLP's activation: down(act(gate(x)) * up(x)). relu2 is squared ReLU (Primer, modded-nanogpt
    # use it ungated); gated, it is still HF Llama/Qwen3 with hidden_act="relu2", so it exports.
    mlp_act: Literal["silu", "relu2"] = "silu"
    # cap * tanh(logits / cap) on the LM head's output (Gemma 2, modded-nanogpt); 0 = off. No transformers
    # Llama/Qwen3 class applies it, so a model with it refuses to export (pipelines.hf_export).
    logit_softcap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"n_heads: head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.mlp_act not in ("silu", "relu2"):
            raise ValueError(f"mlp_act: must be silu or relu2, got {self.mlp_act!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap: must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")


@dataclass(kw_only=True)
class TokenizerConfig:
    """Byte-level BPE trained on the run's own corpus."""

    vocab_size: int = 4096
    min_frequency: int = 2
    train_docs: int = 20000
    path: str | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size: must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")
        if self.train_docs <= 0:
            raise ValueError(f"train_docs: must be > 0, got {self.train_docs}")
