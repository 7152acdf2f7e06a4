"""Unit tests of the per-document rules: normalization, quality heuristics, language ID and PII."""
from __future__ import annotations

import pytest

from cluster.schemas.data import DataConfig, PIIConfig, QualityConfig
from pipelines.data import quality as q
from pipelines.data.clean import clean_text
from pipelines.data.normalize import decode, dedup_key, derived_id, normalize_text
from pipelines.data.pii import redact

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch. "
         "Later that evening the family gathered around the table to share stories about the long summer, "
         "the harvest that came in early, and the storm that nearly flattened the barn in August.")


# ---------------------------------------------------------------- normalize
def test_decode_repairs_invalid_utf8_and_flags_it():
    text, repaired = decode(b"caf\xc3\xa9 ok \xff\xfe broken")
    assert repaired and "\ufffd" in text and text.startswith("café ok")
    assert decode(b"plain") == ("plain", False)


def test_normalize_nfc_controls_and_whitespace():
    decomposed = "Cafe\u0301\x00\x07 \u00a0end\r\nnext\t \n\n\n\n\nlast\u200b  "
    assert normalize_text(decomposed) == "Café  end\nnext\n\nlast"


def test_normalize_keeps_code_indentation():
    code = "def f(x):\n    if x:\n        return 1\n"
    assert normalize_text(code) == code.rstrip("\n")


def test_normalize_empty_and_whitespace_only():
    assert normalize_text("") == ""
    assert normalize_text(" \n\t\r\n ") == ""


def test_normalize_non_latin_untouched():
    text = "日本語のテキストです。Ελληνικά κείμενα. Русский текст."
    assert normalize_text(text) == text


def test_dedup_key_ignores_case_spacing_and_punctuation():
    assert dedup_key("Hello,  World!\n") == dedup_key("hello world")
    assert dedup_key("hello world") != dedup_key("hello there world")


def test_derived_id_is_stable_and_positional():
    assert derived_id("a.jsonl", 3, "x") == derived_id("a.jsonl", 3, "x")
    assert derived_id("a.jsonl", 3, "x") != derived_id("a.jsonl", 4, "x")


# ---------------------------------------------------------------- quality rules
def test_clean_prose_passes_every_rule():
    assert q.first_failure(PROSE, QualityConfig()) is None


@pytest.mark.parametrize("text, rule", [
    ("", "min_words"),
    ("too short to keep", "min_words"),
    ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "min_mean_word_length"),
    (" ".join(["Pneumonoultramicroscopicsilicovolcanoconiosis"] * 30), "max_mean_word_length"),
    (PROSE + " #tag" * 12, "max_symbol_word_ratio"),
    (" ".join(f"{i}.{i} 3{i}4 55{i}" for i in range(30)), "min_alpha_words"),
    ("\n".join(f"- item number {i} on the shopping list today" for i in range(20)), "max_bullet_lines"),
    ("\n".join(f"and then the story went on and on line {i}..." for i in range(20)), "max_ellipsis_lines"),
    ("\n".join(["the same boilerplate footer line here"] * 10 + [PROSE]), "max_duplicate_lines"),
])
def test_each_rule_catches_its_case(text, rule):
    assert q.first_failure(text, QualityConfig(languages=[])) == rule


def test_duplicate_paragraphs():
    para = "This paragraph says the same thing every single time it is repeated here."
    text = f"{para}\n\n{para}\n\n{para}\n\n{PROSE}"
    cfg = QualityConfig(languages=[], max_duplicate_lines=1.0)
    assert q.first_failure(text, cfg) == "max_duplicate_paragraphs"


def test_top_ngram_repetition():
    text = PROSE + " " + " ".join(["buy now cheap"] * 40)
    cfg = QualityConfig(languages=[], max_top_3gram=1.0, max_top_4gram=1.0)
    assert q.first_failure(text, cfg) == "max_top_2gram"
    assert q.top_ngram_char_fraction(PROSE.split(), 2) < 0.1


def test_one_huge_line_is_judged_by_its_words():
    huge = " ".join([PROSE] * 400).replace("\n", " ")  # ~25k words on one line
    assert "\n" not in huge
    cfg = QualityConfig(languages=[], max_top_2gram=1.0, max_top_3gram=1.0, max_top_4gram=1.0)
    assert q.first_failure(huge, cfg) is None
    assert q.first_failure(huge, QualityConfig(languages=[], max_words=1000)) == "max_words"


def test_language_id_keeps_english_and_drops_other_languages():
    cfg = QualityConfig()
    assert q.identify_language(PROSE)[0] == "en"
    german = ("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von der alten "
              "Holzveranda aus zusieht. Später am Abend versammelte sich die Familie um den Tisch und erzählte "
              "Geschichten über den langen Sommer und die frühe Ernte im August.")
    assert q.first_failure(german, cfg) == "language"
    assert q.first_failure(german, QualityConfig(languages=["de"])) is None


def test_non_latin_script_without_spaces():
    chinese = "这是一个很长的中文句子，用来测试语言识别和质量过滤器是否能够正确处理没有空格的文字。" * 5
    assert q.identify_language(chinese)[0] == "zh"
    # word rules count whitespace-separated words: unsegmented scripts need their own thresholds
    assert q.first_failure(chinese, QualityConfig(languages=["zh"])) == "min_words"
    assert q.first_failure(chinese, QualityConfig(languages=["zh"], min_words=1,
                                                  max_mean_word_length=1000)) is None


def test_code_is_not_prose():
    code = "\n".join(f"    x_{i} = compute(x_{i - 1}, {i}) # step {i}" for i in range(1, 40))
    result = q.first_failure(code, QualityConfig())
    assert result is not None


# ---------------------------------------------------------------- PII
def test_pii_placeholders_and_counts():
    text = ("Mail jane.doe+spam@mail.example.org or ops@example.com, call +1 (555) 123-4567 or 555.987.6543, "
            "server 10.0.0.254 and 2001:0db8:85a3:0000:0000:8a2e:0370:7334.")
    out, counts = redact(text)
    assert counts == {"email": 2, "ip": 2, "phone": 2}
    for secret in ("jane.doe", "ops@", "123-4567", "987", "10.0.0.254", "8a2e"):
        assert secret not in out
    assert out.count("<EMAIL>") == 2 and out.count("<PHONE>") == 2 and out.count("<IP_ADDRESS>") == 2


@pytest.mark.parametrize("text", [
    "version 1.2.3.4.5 of the package", "a timestamp 1700000000123 and id 5551234567",
    "the ratio 3.14159 and 999.1.1.1", "python's a::b slice and std::vector", "user@localhost has no TLD",
])
def test_pii_leaves_lookalikes_alone(text):
    assert redact(text) == (text, {"email": 0, "ip": 0, "phone": 0})


def test_pii_switches():
    out, counts = redact("a@b.io 1.2.3.4", PIIConfig(emails=False))
    assert out == "a@b.io <IP_ADDRESS>" and counts["email"] == 0


# ---------------------------------------------------------------- the fused per-document pipeline
def test_clean_text_reasons_and_redaction():
    cfg = DataConfig()
    assert clean_text("   \x00\x01  ", cfg).reason == "normalize:empty"
    assert clean_text("short", cfg).reason == "quality:min_words"
    done = clean_text(PROSE + " Write to me@example.com.", cfg)
    assert done.reason == "" and "<EMAIL>" in done.text and done.pii["email"] == 1


def test_clean_text_with_stages_disabled():
    cfg = DataConfig()
    cfg.quality.enabled = False
    cfg.pii.enabled = False
    done = clean_text("short me@example.com", cfg)
    assert done.reason == "" and done.text == "short me@example.com"
