"""Text normalization: decode (repairing bad UTF-8), Unicode NFC, control characters, whitespace."""
from __future__ import annotations

import hashlib
import re
import unicodedata

# C0/C1 controls except \t and \n (\r is folded into \n first), plus zero-width and BOM characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
# Unicode space separators that are not a plain space (no-break, en/em, ideographic, ...).
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORDS = re.compile(r"\w+")


def decode(raw: bytes | str) -> tuple[str, bool]:
    """Bytes -> text; invalid UTF-8 sequences become U+FFFD. Returns (text, was_repaired)."""
    if isinstance(raw, str):
        return raw, "\ufffd" in raw
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def normalize_text(text: str, form: str = "NFC") -> str:
    """NFC, controls removed, odd spaces -> ' ', CRLF -> LF, trailing spaces and blank-line runs trimmed.

    Indentation and inner runs of spaces are kept: the corpus holds code and docstrings, where they matter.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n").rstrip()


def dedup_key(text: str) -> str:
    """The exact-dedup hash: case-folded words only, so whitespace/punctuation-only variants collide."""
    words = _WORDS.findall(text.casefold())
    return hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).hexdigest()


def derived_id(source: str, ordinal: int, text: str) -> str:
    """A stable id for a document without one: a hash of where it came from and what it says."""
    digest = hashlib.blake2b(f"{source}\0{ordinal}\0{text}".encode("utf-8", "replace"), digest_size=10)
    return digest.hexdigest()
