"""Byte-level BPE tokenizer trained on the run's own corpus, saved in the Hugging Face format.

- Lossless: the ByteLevel pre-tokenizer (no prefix space), the ByteLevel decoder, no normalizer and
  ``clean_up_tokenization_spaces=False`` make ``decode(encode(text)) == text`` for ANY text (all 256 bytes are
  in the base alphabet, so nothing is ever unknown).
- Special tokens (never split by BPE): ``BOS``, ``EOS``, ``PAD`` and the turn markers ``SYSTEM``, ``USER``,
  ``ASSISTANT``. A turn ends with ``EOS``, so generation has ONE stop token for documents and chat turns alike.
- ``encode`` adds no special tokens; the data pipeline decides where BOS/EOS go.
- The chat template wraps assistant content (and its closing EOS) in ``{% generation %}``, so
  ``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`` yields the SFT loss mask.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cluster.storage import ObjectPath, local_copy, location, upload_dir
from pipelines.hf_export import staged_directory

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = EOS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]  # ids 0..5 in this order

# <|bos|><|system|>\n...<|eos|><|user|>\n...<|eos|><|assistant|>\n...<|eos|>
# Only assistant content + its EOS is inside {% generation %}: that is what SFT trains on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT], clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE, padding_side="right")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train on a stream of texts (consumed once, never held whole) and save atomically to ``out_dir``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
    tok, trainer = _bpe(vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = _wrap(tok)
    out_dir = location(out_dir)
    if isinstance(out_dir, ObjectPath):
        with tempfile.TemporaryDirectory(prefix="raylm-tokenizer-") as tmp:
            hf_tok.save_pretrained(tmp, save_jinja_files=False)
            upload_dir(Path(tmp), out_dir, last=("tokenizer.json",))  # tokenizer.json (looked for) goes last
        return load_tokenizer(out_dir)
    with staged_directory(out_dir) as tmp:
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json (one file to ship).
        hf_tok.save_pretrained(str(tmp), save_jinja_files=False)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path | ObjectPath) -> PreTrainedTokenizerFast:
    path = location(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (train one with pipelines.tokenizer.train_tokenizer)")
    with local_copy(path) as local:
        tok = PreTrainedTokenizerFast.from_pretrained(str(local))
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"{path / 'tokenizer.json'}: missing special tokens {missing} (not a raylm tokenizer)")
    return tok


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of tokenizer.json: identifies the vocabulary a tokenized dataset or checkpoint was made with."""
    return hashlib.sha256((location(path) / "tokenizer.json").read_bytes()).hexdigest()


def special_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """{"bos", "eos", "pad", "system", "user", "assistant"} -> id."""
    names = {"bos": BOS, "eos": EOS, "pad": PAD, "system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    return {name: tok.convert_tokens_to_ids(token) for name, token in names.items()}
