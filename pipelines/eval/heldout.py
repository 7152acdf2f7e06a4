"""Held-out text for bits per byte: the data stage's validation documents, or files the user passes.

The data stage keeps every document it trains on in ``<run>/data/documents/*.parquet`` and splits train from
validation by a stable hash of the document id (``pipelines.data.pack.is_validation``), so the validation split
is recovered here as raw text without the stage writing anything more. Documents are taken in a fixed order
(id order for the run's data, file then line order for user files) up to ``max_bytes``: the same inputs give
the same text, byte for byte, and its sha256 goes into the results.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads

from pipelines.data.pack import is_validation


@dataclass(frozen=True)
class HeldOut:
    source: str  # "data:validation" or the files, as given
    texts: list[str]
    truncated: bool  # the byte cap cut the text short

    @property
    def bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def describe(self, max_bytes: int) -> dict:
        return {"source": self.source, "documents": len(self.texts), "bytes": self.bytes, "max_bytes": max_bytes,
                "truncated": self.truncated, "sha256": self.sha256}


def cap_bytes(texts: list[str], max_bytes: int) -> tuple[list[str], bool]:
    """The first documents up to ``max_bytes`` UTF-8 bytes; the last one is cut at a character boundary."""
    out, left = [], max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:
            cut = data[:left].decode("utf-8", errors="ignore")  # drops a character split by the cut
            if cut:
                out.append(cut)
            return out, len(data) > left or len(out) < len(texts)
        out.append(text)
        left -= len(data)
    return out, False


def validation_documents(data_dir: Path, val_fraction: float) -> list[str]:
    """The texts of the data stage's validation documents, in id order."""
    documents = Path(data_dir) / "documents"
    if not any(documents.glob("*.parquet")):
        raise FileNotFoundError(f"{documents}: no documents (run `raylm data` on this run dir first, or pass "
                                "held-out text files with --text)")
    table = pads.dataset(str(documents), format="parquet").to_table(columns=["id", "text"])
    rows = sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    texts = [text for doc_id, text in rows if is_validation(doc_id, val_fraction)]
    if not texts:
        raise ValueError(f"{documents}: no validation document at data.tokenize.val_fraction={val_fraction}")
    return texts


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{path}: held-out text directory has no files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out text file not found")
    return [path]


def read_text_file(path: Path, text_field: str) -> list[str]:
    """Documents of one file: .parquet / .jsonl[.gz] (``text_field`` of each record), else the whole file as
    one UTF-8 document. A file that cannot be read or decoded raises naming it."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            table = pads.dataset(str(path), format="parquet").to_table()
            if text_field not in table.column_names:
                raise ValueError(f"{path}: no column {text_field!r} (eval.text_field)")
            return [t for t in table.column(text_field).to_pylist() if t]
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            texts = []
            with opener(path, "rt", encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                            raise ValueError(f"{path}:{i}: needs a string field {text_field!r} (eval.text_field)")
                        texts.append(record[text_field])
            return texts
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON lines ({exc.msg})") from None
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc.strerror or exc})") from None


def load_heldout(files: list[str], data_dir: Path, val_fraction: float, text_field: str,
                 max_bytes: int) -> HeldOut:
    if files:
        texts = [t for f in files for p in _expand(Path(f)) for t in read_text_file(p, text_field)]
        if not any(texts):
            raise ValueError(f"eval.text: no text in {', '.join(files)}")
        source = ",".join(files)
    else:
        texts, source = validation_documents(data_dir, val_fraction), "data:validation"
    kept, truncated = cap_bytes([t for t in texts if t], max_bytes)
    return HeldOut(source=source, texts=kept, truncated=truncated)
