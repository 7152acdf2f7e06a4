"""Tiny Hugging Face models for the alignment tests, built locally in seconds (no downloads).

The project's tokenizer (``pipelines.tokenizer``: byte-level BPE, chat template with ``{% generation %}`` tags)
trained on a few hundred lines, and LLaMA models a few thousand parameters big.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def corpus_lines() -> list[str]:
    import json
    import os.path
    import textwrap

    lines = []
    for mod in (json, os.path, textwrap):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if name.startswith("_") or not doc:
                continue
            lines.append(f"What does `{mod.__name__}.{name}` do? {doc.strip().splitlines()[0]}")
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """The project's tokenizer (byte-level BPE + raylm chat template), trained on a few hundred docstring lines."""
    from pipelines.tokenizer import train_tokenizer

    return train_tokenizer(corpus_lines() * 2, out_dir, vocab_size=vocab_size)


def llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    kwargs = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
              "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_causal_lm(out_dir: Path, seed: int = 0) -> Path:
    """A random tiny ``LlamaForCausalLM`` + tokenizer in ``out_dir`` (the shape of ``<run-dir>/pretrain/model``)."""
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(out_dir)
    return out_dir


def build_reward_model(lm_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """The causal LM's body with a fresh scalar head (the shape of ``<run-dir>/reward/model``)."""
    import torch
    from transformers import AutoTokenizer

    from pipelines.hf_models import init_reward_model

    torch.manual_seed(seed)
    model = init_reward_model(lm_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out_dir)
    return Path(out_dir)
