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


# ChatML, as Qwen's and many other models' own templates: no {% generation %} tags, turns end with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_foreign_causal_lm(out_dir: Path, arch: str, seed: int = 0, max_positions: int = 256) -> Path:
    """A random tiny non-Llama causal LM with a tokenizer unlike the project's, as a user would bring:

    - ``qwen3``: ``Qwen3ForCausalLM``; a ChatML template (no generation tags), EOS ``<|im_end|>``, no BOS.
    - ``gpt_neox``: ``GPTNeoXForCausalLM`` (untied ``embed_out`` head); no chat template and no pad token.
    """
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    if arch == "qwen3":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token, tok.bos_token, tok.chat_template = "<|im_end|>", None, CHATML_TEMPLATE
        config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=max_positions, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
        cls = Qwen3ForCausalLM
    elif arch == "gpt_neox":
        tok.pad_token, tok.chat_template = None, None
        config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=max_positions,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(f"arch: {arch!r}")
    for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)  # rewritten below without the project's template
    tok.save_pretrained(out_dir)
    torch.manual_seed(seed)
    cls(config).save_pretrained(out_dir)
    return out_dir
