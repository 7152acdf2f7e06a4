"""normalize -> quality -> pii for one document, and the Ray Data batch UDF around it.

Each output row keeps the document and says why it was dropped (``reason``: ``""`` when kept, else
``<stage>:<rule>``), with per-document counters that stats.json aggregates with Ray Data.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.schemas.data import DataConfig
from pipelines.data.normalize import dedup_key, normalize_text
from pipelines.data.pii import PII_KINDS, redact
from pipelines.data.quality import first_failure


@dataclass
class Cleaned:
    text: str
    reason: str
    changed: bool
    pii: dict[str, int]


def clean_text(text: str, cfg: DataConfig) -> Cleaned:
    """Run the enabled per-document stages on one (already decoded) text."""
    pii = {kind: 0 for kind in PII_KINDS}
    original = text
    if cfg.normalize.enabled:
        text = normalize_text(text, cfg.normalize.form)
    changed = text != original
    if not text.strip():
        return Cleaned(text, "normalize:empty", changed, pii)
    if cfg.quality.enabled:
        failed = first_failure(text, cfg.quality)
        if failed:
            return Cleaned(text, f"quality:{failed}", changed, pii)
    if cfg.pii.enabled:
        text, pii = redact(text, cfg.pii)
    return Cleaned(text, "", changed, pii)


def clean_batch(batch: dict, cfg: DataConfig) -> dict:
    """Ray Data UDF over reader rows (see sources.COLUMNS)."""
    out: dict[str, list] = {k: [] for k in ("id", "text", "source", "meta", "reason", "read_error",
                                            "bytes_in", "bytes_out", "repaired", "changed", "dedup_key")}
    for kind in PII_KINDS:
        out[f"pii_{kind}"] = []
    for doc_id, text, source, meta, repaired, error in zip(batch["id"], batch["text"], batch["source"],
                                                           batch["meta"], batch["repaired"], batch["read_error"]):
        text = str(text)
        if error:
            result = Cleaned("", "input:unreadable", False, {k: 0 for k in PII_KINDS})
        else:
            result = clean_text(text, cfg)
        kept = not result.reason
        out["id"].append(str(doc_id))
        out["text"].append(result.text if kept else "")  # dropped text is not carried further
        out["source"].append(str(source))
        out["meta"].append(str(meta))
        out["reason"].append(result.reason)
        out["read_error"].append(str(error))
        out["bytes_in"].append(len(text.encode("utf-8")))
        out["bytes_out"].append(len(result.text.encode("utf-8")) if kept else 0)
        out["repaired"].append(int(bool(repaired)))
        out["changed"].append(int(result.changed))
        out["dedup_key"].append(dedup_key(result.text) if kept else "")
        for kind in PII_KINDS:
            out[f"pii_{kind}"].append(result.pii[kind])
    return out
