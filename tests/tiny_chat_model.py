"""A tiny random-weight Llama chat model (the project tokenizer trained here, with its chat template): a fixture of
the serving tests and of ``benchmarks/serve.py`` (when no trained model is given). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path


def _corpus() -> list[str]:
    """Some English text to train the byte-level BPE on: this package's and the stdlib's docstrings."""
    import json
    import os
    import typing

    texts = [m.__doc__ or "" for m in (json, os, typing, Path)]
    texts += [f.__doc__ or "" for f in vars(os.path).values() if callable(f)]
    return [t for t in texts if t] * 4


def build_tiny_chat_model(out_dir: str | Path, vocab_size: int = 512, dim: int = 64, layers: int = 2,
                          max_positions: int = 512, seed: int = 0) -> Path:
    """The project's tokenizer (pipelines.tokenizer: byte-level BPE, raylm chat template) trained on a small
    local corpus, and a random LlamaForCausalLM, saved together in Hugging Face format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.tokenizer import train_tokenizer

    out = Path(out_dir)
    tok = train_tokenizer(_corpus(), out, vocab_size)  # writes out/ whole: before the model goes in
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=dim * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
