"""Gopher/C4-style quality rules and language identification; each rule is a pure function of the text.

``first_failure`` returns the name of the first failing rule (the ``quality:<rule>`` drop reason) or None.
Thresholds and their meaning: cluster/schemas/data.py (QualityConfig) and docs/data.md.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from cluster.schemas.data import QualityConfig

_WORD = re.compile(r"\S+")
_BULLET = re.compile(r"^\s*[-*•‣◦▪●·]\s")
_ELLIPSIS_END = re.compile(r"(\.\.\.|…)\s*$")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
_ALPHA = re.compile(r"[^\W\d_]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def mean_word_length(ws: list[str]) -> float:
    return sum(map(len, ws)) / len(ws) if ws else 0.0


def symbol_word_ratio(text: str, ws: list[str]) -> float:
    if not ws:
        return 0.0
    return (text.count("#") + text.count("...") + text.count("…")) / len(ws)


def _nonblank_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def bullet_line_fraction(text: str) -> float:
    lines = _nonblank_lines(text)
    return sum(bool(_BULLET.match(line)) for line in lines) / len(lines) if lines else 0.0


def ellipsis_line_fraction(text: str) -> float:
    lines = _nonblank_lines(text)
    return sum(bool(_ELLIPSIS_END.search(line)) for line in lines) / len(lines) if lines else 0.0


def duplicate_fraction(items: list[str]) -> float:
    """Fraction of items that repeat an earlier item."""
    if not items:
        return 0.0
    return (len(items) - len(set(items))) / len(items)


def duplicate_line_fraction(text: str) -> float:
    return duplicate_fraction([line.strip() for line in _nonblank_lines(text)])


def duplicate_paragraph_fraction(text: str) -> float:
    return duplicate_fraction([p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()])


def top_ngram_char_fraction(ws: list[str], n: int) -> float:
    """Gopher: characters covered by the most frequent word n-gram / characters in all words."""
    if len(ws) < n:
        return 0.0
    lowered = [w.lower() for w in ws]
    counts = Counter(zip(*(lowered[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, lowered))
    return count * sum(map(len, gram)) / total if total else 0.0


def alpha_word_fraction(ws: list[str]) -> float:
    return sum(bool(_ALPHA.search(w)) for w in ws) / len(ws) if ws else 0.0


@lru_cache(maxsize=1)
def _language_identifier():
    # py3langid ships its trained model inside the wheel; norm_probs gives a probability in [0, 1].
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid, on the first 2,000 characters."""
    lang, prob = _language_identifier().classify(text[:2000])
    return lang, float(prob)


def first_failure(text: str, cfg: QualityConfig) -> str | None:
    """Name of the first rule ``text`` fails (cheapest rules first), or None when it passes them all."""
    ws = words(text)
    if len(ws) < cfg.min_words:
        return "min_words"
    if len(ws) > cfg.max_words:
        return "max_words"
    mean = mean_word_length(ws)
    if mean < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if mean > cfg.max_mean_word_length:
        return "max_mean_word_length"
    checks = (
        ("max_symbol_word_ratio", lambda: symbol_word_ratio(text, ws) > cfg.max_symbol_word_ratio),
        ("min_alpha_words", lambda: alpha_word_fraction(ws) < cfg.min_alpha_words),
        ("max_bullet_lines", lambda: bullet_line_fraction(text) > cfg.max_bullet_lines),
        ("max_ellipsis_lines", lambda: ellipsis_line_fraction(text) > cfg.max_ellipsis_lines),
        ("max_duplicate_lines", lambda: duplicate_line_fraction(text) > cfg.max_duplicate_lines),
        ("max_duplicate_paragraphs", lambda: duplicate_paragraph_fraction(text) > cfg.max_duplicate_paragraphs),
        ("max_top_2gram", lambda: top_ngram_char_fraction(ws, 2) > cfg.max_top_2gram),
        ("max_top_3gram", lambda: top_ngram_char_fraction(ws, 3) > cfg.max_top_3gram),
        ("max_top_4gram", lambda: top_ngram_char_fraction(ws, 4) > cfg.max_top_4gram),
    )
    for name, failed in checks:
        if failed():
            return name
    if cfg.languages:
        lang, prob = identify_language(text)
        if lang not in cfg.languages or prob < cfg.min_language_score:
            return "language"
    return None
