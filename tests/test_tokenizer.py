import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipelines.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
    train_tokenizer,
)

HARD_TEXTS = [
    "Hello, world!",
    "数据并行训练 と 日本語のテキスト, 한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "combining marks: e\u0301 a\u0308 \u0915\u094d\u0937 Z\u0351\u0300",
    "\ttabs\t\tand   runs of    spaces\n\n\n\nand newlines\r\n",
    "  leading spaces and trailing   ",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\n\tif x != 0: pass\n",
    "zero width\u200bjoiner\u200d and nbsp\u00a0here, BOM \ufeff",
    "",
    " ",
    "\x00\x01 control \x7f bytes",
]


def corpus(n_docs, seed=0):
    """A generator (streamed, never a list): English-ish words, code and non-ASCII."""
    rng = random.Random(seed)
    words = ["the", "model", "trains", "on", "data", "ray", "serve", "token", "def", "return", "数据", "🙂",
             "naïve", "    ", "\n", "\t", "for i in range(10):", "x = y + 1"]
    for _ in range(n_docs):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(corpus(3000), out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_trains_from_a_generator_and_saves_hf_files(tok_dir, tok):
    assert (tok_dir / "tokenizer.json").is_file()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert "{% generation %}" in config["chat_template"]
    assert config["clean_up_tokenization_spaces"] is False
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 512  # merges were learned
    assert not [p for p in tok_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_decode_round_trips_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_round_trip_after_loading_with_plain_transformers(tok_dir):
    plain = AutoTokenizer.from_pretrained(tok_dir)
    assert isinstance(plain, PreTrainedTokenizerFast)
    for text in HARD_TEXTS:
        assert plain.decode(plain(text).input_ids) == text


def test_merges_compress_the_training_distribution(tok):
    text = next(corpus(1, seed=99))
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_encode_adds_no_special_tokens(tok):
    ids = tok.encode("the model")
    assert not set(ids) & set(special_token_ids(tok).values())


def test_special_tokens_are_single_ids_never_split(tok):
    ids = special_token_ids(tok)
    assert sorted(ids) == ["assistant", "bos", "eos", "pad", "system", "user"]
    assert len(set(ids.values())) == 6
    for token in (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT):
        assert tok.encode(token) == [tok.convert_tokens_to_ids(token)]
    inside = tok.encode(f"the{EOS}model{USER}")
    assert ids["eos"] in inside and ids["user"] in inside
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is Ray?"},
    {"role": "assistant", "content": "A framework 🙂"},
    {"role": "user", "content": "And serve?"},
    {"role": "assistant", "content": "Model serving."},
]


def test_chat_template_text(tok):
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}{SYSTEM}\nBe brief.{EOS}{USER}\nWhat is Ray?{EOS}{ASSISTANT}\n"
    no_prompt = tok.apply_chat_template(CHAT[:2], tokenize=False)
    assert not no_prompt.endswith(f"{ASSISTANT}\n")


def test_assistant_mask_covers_assistant_content_and_its_eos(tok):
    out = tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    eos = tok.eos_token_id
    # Exactly the two assistant replies, each ending with its EOS, and nothing else.
    assert tok.decode(masked) == f"A framework 🙂{EOS}Model serving.{EOS}"
    assert ids[-1] == eos and mask[-1] == 1
    first_eos = ids.index(eos)  # end of the system turn: not trained on
    assert mask[first_eos] == 0
    assert mask[ids.index(tok.convert_tokens_to_ids(ASSISTANT))] == 0


def test_unknown_role_is_an_error(tok):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_hash_identifies_the_vocabulary(tok_dir, tmp_path):
    assert tokenizer_hash(tok_dir) == tokenizer_hash(tok_dir)
    assert len(tokenizer_hash(tok_dir)) == 64
    other = tmp_path / "other"
    train_tokenizer(corpus(300, seed=1), other, vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(tok_dir)


def test_retraining_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_tokenizer(corpus(300, seed=5), a, vocab_size=320)
    train_tokenizer(corpus(300, seed=5), b, vocab_size=320)
    assert tokenizer_hash(a) == tokenizer_hash(b)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus(10), tmp_path / "t", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    assert not (tmp_path / "t").exists()


def test_a_failing_corpus_stream_leaves_no_tokenizer(tmp_path):
    def broken():
        yield from corpus(50)
        raise OSError("corpus shard unreadable")

    with pytest.raises(Exception, match="corpus shard unreadable"):
        train_tokenizer(broken(), tmp_path / "t", vocab_size=300)
    assert list(tmp_path.iterdir()) == []
