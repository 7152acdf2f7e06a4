"""A tiny random-weight Llama chat model (tokenizer trained here, chat template included), for tests and for
``benchmarks/serve.py`` when no trained model is given. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

# ChatML-style, the common Hugging Face convention; the template is what apply_chat_template renders.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


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
    """Train a byte-level BPE tokenizer and save a random LlamaForCausalLM in Hugging Face format."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                     pad_token="<pad>", unk_token=None)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=dim, intermediate_size=dim * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id,
                         pad_token_id=hf_tok.pad_token_id, initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
