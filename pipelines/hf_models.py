"""Hugging Face models of the alignment stages: check and load a starting model (any causal LM transformers
loads, from a directory or a hub id), put a scalar head on its body (reward model, PPO critic), load a reward
model, and export trained weights as a model dir with its tokenizer.

Shared by sft, reward and ppo (``pipelines.chat`` holds their shared data code), so none imports another.
Hub ids are handed to transformers as they are: nothing here downloads by itself.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# A local model dir holds at least one of these. Without any, transformers 5 builds an empty tokenizer (its
# special tokens only) instead of failing, and training would go on with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Config attributes that hold a model's context length, by family (GPT-2 maps max_position_embeddings itself).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def resolve_model_ref(ref: str, key: str) -> str:
    """An existing local path -> its absolute path; a path-looking ref that does not exist fails naming ``key``;
    anything else is a hub id, passed through."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{key}: {ref} is a file, not a model directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"{key}: {path.resolve()}: the model directory is not readable (permissions)")
        missing = [] if (path / "config.json").is_file() else ["config.json"]
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES[::2]))
        if missing:
            raise FileNotFoundError(f"{key}: {path.resolve()}: not a Hugging Face model directory "
                                    f"(missing {', '.join(missing)})")
        return str(path.resolve())
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1:
        raise FileNotFoundError(f"{key}: {ref}: no such model directory")
    return ref


def model_config(ref: str, key: str = "model"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{key}: {ref}: transformers cannot read its config: {str(exc).splitlines()[0]}") from None


def context_length(config) -> int | None:
    for name in CONTEXT_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _project_template(tokenizer) -> str:
    from pipelines.tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE if tokenizer.bos_token else CHAT_TEMPLATE.replace("{{ bos_token }}", "")


def load_tokenizer(ref: str | Path):
    """The model's own tokenizer, with the project's chat template where it has none and its EOS as the pad
    token where it has no pad token (GPT-2 style): what every stage tokenizes with and exports."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref))
    if not tokenizer.chat_template:
        tokenizer.chat_template = _project_template(tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_base_model(ref: str, key: str, seq_len: int, seq_len_key: str, scalar_head: bool = False) -> str:
    """Everything a stage needs of a starting model, checked on the driver before Ray starts; returns the
    resolved ref. Fails naming ``key`` and what is missing: the directory or its files, a config transformers
    reads, a causal-LM head (and, with ``scalar_head``, a sequence-classification class for the reward model and
    critic), a context of at least ``seq_len`` tokens, a tokenizer with an EOS token."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    ref = resolve_model_ref(ref, key)
    config = model_config(ref, key)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{key}: {ref}: model_type {config.model_type!r} has no causal-LM class in transformers")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    causal = {causal} if isinstance(causal, str) else set(causal)
    if config.architectures and not causal & set(config.architectures):
        raise ValueError(f"{key}: {ref}: a {', '.join(config.architectures)} checkpoint has no causal-LM head "
                         f"(expected {' or '.join(sorted(causal))}); start from the language model, not a "
                         f"classifier or a bare body")
    if scalar_head and config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"{key}: {ref}: model_type {config.model_type!r} has no sequence-classification class in "
                         f"transformers (the reward model and the PPO critic need one)")
    context = context_length(config)
    if context is not None and context < seq_len:
        raise ValueError(f"{key}: {ref}: the model's context is {context} tokens, shorter than "
                         f"{seq_len_key}={seq_len}")
    if Path(ref).is_dir() and not any((Path(ref) / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}: {ref}: no tokenizer transformers can load (none of "
                                f"{', '.join(TOKENIZER_FILES)}): save the tokenizer with the model")
    try:
        tokenizer = load_tokenizer(ref)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{key}: {ref}: no tokenizer transformers can load: {str(exc).splitlines()[0]}") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ValueError(f"{key}: {ref}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size={vocab}")
    if tokenizer.eos_token is None:
        raise ValueError(f"{key}: {ref}: the tokenizer has no eos_token (needed to end chat turns and rollouts)")
    return ref


def load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def init_reward_model(lm_dir: str | Path):
    """A reward model from a causal LM dir: its body, plus a fresh scalar head (the architecture's own
    ``...ForSequenceClassification``, 1 label)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers reports the fresh head as MISSING: that is the point here
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(lm_dir), num_labels=1)
    finally:
        hf_logging.set_verbosity(level)


def load_reward_model(path: str | Path):
    from transformers import AutoModelForSequenceClassification

    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"reward model: no config.json in {path}")
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    if model.config.num_labels != 1:
        raise ValueError(f"reward model: {path} has num_labels={model.config.num_labels}, expected 1")
    return model


def export_hf_model(state_dict: dict[str, torch.Tensor], out_dir: Path, *, base_dir: str, kind: str = "causal",
                    card=None) -> None:
    """Write trained weights as a Hugging Face model dir (atomically: staged, then renamed), with the tokenizer
    (``load_tokenizer``'s: a base model without a chat template leaves with the project's) and the model card
    (``card``: a ``pipelines.model_card.CardInfo``).

    ``kind``: "causal" (``AutoModelForCausalLM``) or "reward" (``AutoModelForSequenceClassification``, 1 label).
    """
    from pipelines.hf_export import staged_directory
    from pipelines.model_card import write_model_card

    model = load_causal_lm(base_dir) if kind == "causal" else init_reward_model(base_dir)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embedding
        raise RuntimeError(f"export: weights do not fit {base_dir}: missing {missing}, unexpected {unexpected}")
    with staged_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(base_dir).save_pretrained(tmp)
        write_model_card(tmp, card)
