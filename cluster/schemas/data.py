from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class NormalizeConfig:
    enabled: bool = True


@dataclass(kw_only=True)
class QualityConfig:
    enabled: bool = True
    min_words: int = 20
    max_words: int = 100000


@dataclass(kw_only=True)
class PIIConfig:
    enabled: bool = True


@dataclass(kw_only=True)
class ExactDedupConfig:
    enabled: bool = True


@dataclass(kw_only=True)
class NearDedupConfig:
    enabled: bool = True
    shingle_size: int = 5
    num_perm: int = 128
    bands: int = 16
    rows: int = 8

    def __post_init__(self) -> None:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands: bands*rows ({self.bands}*{self.rows}) must equal num_perm ({self.num_perm})")


@dataclass(kw_only=True)
class TokenizeConfig:
    enabled: bool = True
    seq_len: int = 256
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass(kw_only=True)
class DataConfig:
    input: list[str] = field(default_factory=list)  # empty: the built-in corpus of installed package docs
    text_field: str = "text"
    on_error: Literal["fail", "skip"] = "fail"
    num_blocks: int = 8
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
