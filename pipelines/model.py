"""A LLaMA-style decoder-only transformer, written to be read (nanoGPT-style) and cut by pipeline parallelism.

Architecture (identical maths to HF ``LlamaForCausalLM``, so ``pipelines.hf_export`` is a pure renaming):
token embedding -> n x [RMSNorm -> grouped-query attention with RoPE -> residual;
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (optionally tied to the embedding).
Options (``ModelConfig``): ``qk_norm`` (per-head RMSNorm of q and k before RoPE: HF ``Qwen3ForCausalLM``),
``mlp_act: relu2`` (squared ReLU in the gated MLP: HF ``hidden_act="relu2"``), ``logit_softcap`` (no HF
equivalent: such a model trains but does not export).

``Transformer.as_layers()`` returns ``[EmbeddingLayer, Block_0 .. Block_{n-1}, HeadLayer]``; each maps ONE tensor
to ONE tensor (tokens -> hidden -> ... -> logits) and owns everything it needs (each block builds its own RoPE
tables as non-persistent buffers), so DeepSpeed's ``PipelineModule`` can cut the list anywhere.
``Transformer.forward`` is literally that list run in order.

Shapes: B batch, T sequence, D model dim, H query heads, K key/value heads, Dh head dim, F ffn dim, V vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cluster.schemas.model import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like HF Llama (so bf16 runs match the exported model)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim] in HF Llama's rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [Dh/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, Dh/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, Dh]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the rotate-half convention, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, Dh]; cos/sin: [T, Dh] (broadcast over batch and heads)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query attention: H query heads share K key/value heads (H % K == 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # one weight of [Dh] shared by all heads, as in Qwen3
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, K, T, Dh]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h uses kv head h // (H/K). Expanding explicitly (instead of SDPA's enable_gqa) keeps every
        # SDPA backend available (flash / memory-efficient / math) on every device and dtype.
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # [B, H, T, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); act is silu (SwiGLU) or squared ReLU (``mlp_act``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = F.silu if cfg.mlp_act == "silu" else relu2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))  # [B, T, D] -> [B, T, F] -> [B, T, D]


class Block(nn.Module):
    """Pre-norm transformer block: hidden [B, T, D] -> hidden [B, T, D]. Owns its RoPE tables."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: derived from the config, so never in checkpoints; per block so a pipeline stage
        # holding any subset of blocks is self-contained.
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, Dh]
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:T].to(h.dtype), self.rope_sin[:T].to(h.dtype)
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class EmbeddingLayer(nn.Embedding):
    """tokens LongTensor[B, T] -> hidden [B, T, D]."""


class HeadLayer(nn.Module):
    """hidden [B, T, D] -> logits [B, T, V]: final RMSNorm + LM head (weight shared with the embedding if tied)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.softcap = cfg.logit_softcap
        if tied_embedding is not None:
            self.output.weight = tied_embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(h))
        if self.softcap:  # bounds the logits smoothly: no single token's logit runs away early in training
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size: must be > 0, got {vocab_size}")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = EmbeddingLayer(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = HeadLayer(cfg, vocab_size, self.embed if cfg.tie_embeddings else None)
        self.gradient_checkpointing = False

    def as_layers(self) -> list[nn.Module]:
        """The model as a tensor -> tensor chain: [EmbeddingLayer, Block_0..Block_{n-1}, HeadLayer]."""
        return [self.embed, *self.layers, self.head]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens LongTensor[B, T] -> logits [B, T, V]; with labels LongTensor[B, T], the mean next-token loss.

        The loss lives in forward so that a compiled model (torch.compile / ``engine.compile()``) compiles it
        too: inductor then fuses the fp32 upcast and log-softmax over the vocabulary into the head's graph
        instead of materialising [B, T, V] fp32 logits and their gradient in memory (measured on the 125M GPU
        recipe, see docs/pretrain.md)."""
        x = tokens
        for layer in self.as_layers():
            if self.gradient_checkpointing and self.training and isinstance(layer, Block):
                # Recompute the block in backward instead of storing its activations.
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x if labels is None else next_token_loss(x, labels)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against labels [B, T], in fp32 whatever the training precision."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def init_weights(model: Transformer, seed: int) -> None:
    """Deterministic init from ``seed`` alone (independent of the global RNG): N(0, init_std) for matrices,
    scaled by 1/sqrt(2 * n_layers) for the projections that write into the residual stream (GPT-2), ones for
    norms. Parameters are visited in name order, so the result depends only on (cfg, vocab_size, seed)."""
    cfg = model.cfg
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # named_parameters() yields a tied weight once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("attn.wo.weight", "mlp.w_down.weight")) else cfg.init_std
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            param.copy_(values)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> Transformer:
    model = Transformer(cfg, vocab_size)
    init_weights(model, seed)
    return model


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Distinct parameters (a tied embedding/head counts once); ``non_embedding`` drops the token embedding
    (and the head, when untied) as in the scaling-law papers."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding and isinstance(model, Transformer):
        total -= model.embed.weight.numel()
        if not model.cfg.tie_embeddings:
            total -= model.head.output.weight.numel()
    return total


def layer_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> list[float]:
    """Training FLOPs per token (forward + backward) of each entry of ``Transformer.as_layers()``: 0 for the
    embedding (a lookup), 6 * N_matmul + 12 * dim * seq_len per block, 6 * dim * vocab_size for the head.

    N_matmul counts the weights used in matrix multiplies (the projections; not norms). The second block term is
    attention's QK^T and AV (PaLM appendix B convention, no causal discount). Pipeline stages are balanced on
    these: the LM head of a small model costs as much as several blocks, so balancing parameter counts (the
    embedding weighs as much as the head but costs nothing) leaves the last stage doing twice the work."""
    head_dim = cfg.dim // cfg.n_heads
    attn = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # wq, wo, wk, wv
    mlp = 3 * cfg.dim * cfg.ffn_dim
    block = 6.0 * (attn + mlp) + 12.0 * cfg.dim * seq_len
    return [0.0, *[block] * cfg.n_layers, 6.0 * cfg.dim * vocab_size]


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of the whole model, for MFU: the sum of ``layer_flops_per_token``."""
    return sum(layer_flops_per_token(cfg, vocab_size, seq_len))
