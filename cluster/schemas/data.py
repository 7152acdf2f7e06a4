"""``data:`` section: the Ray Data pipeline (read -> normalize -> quality -> pii -> dedup -> tokenize).

Every threshold is documented in docs/data.md; the quality defaults follow the Gopher rules (Rae et al. 2021)
and C4, loosened where noted for API documentation (code-heavy prose).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _check_fraction(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {value}")


def _check_positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(obj, name)}")


@dataclass(kw_only=True)
class NormalizeConfig:
    enabled: bool = True
    form: Literal["NFC", "NFKC"] = "NFC"


@dataclass(kw_only=True)
class QualityConfig:
    """A document is dropped by the first rule it fails; the reason is ``quality:<field name>``."""

    enabled: bool = True
    min_words: int = 20
    max_words: int = 100000
    min_mean_word_length: float = 2.5
    max_mean_word_length: float = 12.0
    max_symbol_word_ratio: float = 0.1       # ('#' + '...' + '…') per word
    max_bullet_lines: float = 0.9            # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3          # fraction of lines ending with '...' or '…'
    max_duplicate_lines: float = 0.3         # fraction of lines that repeat an earlier line
    max_duplicate_paragraphs: float = 0.3    # fraction of paragraphs that repeat an earlier one
    max_top_2gram: float = 0.2               # chars covered by the most frequent word 2-gram / all word chars
    max_top_3gram: float = 0.18
    max_top_4gram: float = 0.16
    min_alpha_words: float = 0.6             # fraction of words with a letter (Gopher: 0.8; code docs need less)
    languages: list[str] = field(default_factory=lambda: ["en"])  # py3langid codes; [] disables language ID
    min_language_score: float = 0.5          # normalized probability of the detected language

    def __post_init__(self) -> None:
        _check_positive(self, "min_words", "max_words", "max_mean_word_length")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words: {self.min_words} exceeds max_words={self.max_words}")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError(f"min_mean_word_length: exceeds max_mean_word_length={self.max_mean_word_length}")
        _check_fraction(self, "max_bullet_lines", "max_ellipsis_lines", "max_duplicate_lines",
                        "max_duplicate_paragraphs", "max_top_2gram", "max_top_3gram", "max_top_4gram",
                        "min_alpha_words", "min_language_score")
        if self.max_symbol_word_ratio < 0:
            raise ValueError(f"max_symbol_word_ratio: must be >= 0, got {self.max_symbol_word_ratio}")
        for code in self.languages:
            if not (2 <= len(code) <= 3 and code.isalpha() and code.islower()):
                raise ValueError(f"languages: {code!r} is not an ISO 639-1 code such as 'en'")


@dataclass(kw_only=True)
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True


@dataclass(kw_only=True)
class ExactDedupConfig:
    enabled: bool = True


@dataclass(kw_only=True)
class NearDedupConfig:
    """MinHash LSH: ``bands`` x ``rows`` = ``num_perm``. With 16 x 8 a pair at Jaccard 0.8 becomes a candidate
    with probability 0.95 (0.7: 0.61, 0.5: 0.06); candidates are then kept as duplicates only if their
    signatures agree on at least ``threshold`` of the permutations (estimated Jaccard)."""

    enabled: bool = True
    shingle_size: int = 5           # words per shingle
    num_perm: int = 128
    bands: int = 16
    rows: int = 8
    # estimated Jaccard a candidate pair must reach (0 keeps every LSH candidate). Below 0.8 on purpose: with 128
    # permutations the estimate's standard deviation is ~0.03 near J=0.84, so a 0.8 cut lost 8% of planted near
    # copies (benchmark recall 0.958); 0.75 keeps them (0.996) and still rejects pairs under J~0.65.
    threshold: float = 0.75
    seed: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "shingle_size", "num_perm", "bands", "rows")
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands: bands*rows ({self.bands}*{self.rows}) must equal num_perm ({self.num_perm})")
        _check_fraction(self, "threshold")


@dataclass(kw_only=True)
class TokenizeConfig:
    enabled: bool = True
    seq_len: int = 256
    val_fraction: float = 0.05
    batch_docs: int = 512           # docs per tokenize/pack batch; each batch drops its last partial sequence

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        _check_positive(self, "seq_len", "batch_docs")


@dataclass(kw_only=True)
class BuiltinCorpusConfig:
    """Limits of the built-in corpus (docs of the installed Python packages and the standard library)."""

    max_python_files: int = 1500    # .py files read for docstrings (standard library first)
    max_package_docs: int = 600     # METADATA long descriptions, README and LICENSE files
    max_doc_chars: int = 12000      # longer module docs are split into several documents

    def __post_init__(self) -> None:
        _check_positive(self, "max_python_files", "max_package_docs", "max_doc_chars")


@dataclass(kw_only=True)
class DataConfig:
    input: list[str] = field(default_factory=list)  # empty: the built-in corpus of installed package docs
    text_field: str = "text"
    id_field: str = "id"
    on_error: Literal["fail", "skip"] = "fail"
    num_blocks: int = 8             # parallelism of the read and of every shuffle
    max_text_file_mb: float = 64    # a text input (one document per file) is read whole: larger ones fail
    builtin: BuiltinCorpusConfig = field(default_factory=BuiltinCorpusConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "num_blocks", "max_text_file_mb")
        if not self.text_field:
            raise ValueError("text_field: must not be empty")
