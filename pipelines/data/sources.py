"""Corpus input: list files (local paths or ``s3://``/``gs://`` URIs through pyarrow filesystems) on the
driver, then read them on Ray workers, one file per task, streaming batches of documents.

Why a file-level reader instead of ``ray.data.read_json``: one corrupt file must either stop the run with an
error naming that file or (``data.on_error: skip``) be recorded and skipped while the rest is read, and
invalid UTF-8 must be repaired rather than fail pyarrow's JSON parser. Decompression (gzip/zstd/bz2) and
object stores are pyarrow's.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.schemas.data import DataConfig
from pipelines.data.builtin_corpus import extract, list_builtin_files
from pipelines.data.normalize import decode, derived_id

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text",
         ".md": "text", ".rst": "text"}
COLUMNS = ("id", "text", "source", "meta", "repaired", "read_error")
BATCH_DOCS = 256


class CorpusReadError(ValueError):
    """An input file could not be read; the message starts with the file."""


def _split_suffixes(path: str) -> tuple[str, str | None]:
    """'a/b.jsonl.gz' -> ('jsonl' kind, 'gzip'); unknown kinds give ('', ...)."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    dot = name.rfind(".")
    return KINDS.get(name[dot:] if dot >= 0 else "", ""), compression


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def list_input_files(inputs: list[str]) -> list[dict]:
    """Expand files/directories/URIs into ``{"path", "kind"}`` rows (sorted); missing inputs are errors."""
    rows = []
    for uri in inputs:
        fs, path = _filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data.input: {uri} does not exist")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            prefix = uri[: uri.index("://") + 3] if "://" in uri else ""
            found = [prefix + i.path for i in infos if i.type == pafs.FileType.File
                     and not i.base_name.startswith(".") and _split_suffixes(i.path)[0]]
            if not found:
                raise FileNotFoundError(f"data.input: {uri} holds no .jsonl/.parquet/.txt files")
        else:
            if not _split_suffixes(path)[0]:
                raise ValueError(f"data.input: {uri}: unsupported file type (use .jsonl, .parquet or .txt, "
                                 "optionally .gz/.zst)")
            found = [uri]
        rows += [{"path": p, "kind": _split_suffixes(p)[0], "root": ""} for p in sorted(found)]
    return rows


def list_corpus_files(cfg: DataConfig) -> list[dict]:
    return list_input_files(cfg.input) if cfg.input else list_builtin_files(cfg.builtin)


def _safe_text(value) -> tuple[str, bool]:
    """Any JSON/parquet value -> a str that UTF-8 can encode (lone surrogates replaced), and whether repaired."""
    text, repaired = decode(value if isinstance(value, (bytes, str)) else ("" if value is None else str(value)))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text, repaired = text.encode("utf-8", errors="replace").decode("utf-8"), True
    return text, repaired


def _doc(record: dict, path: str, ordinal: int, cfg: DataConfig, repaired: bool) -> dict:
    if cfg.text_field not in record:
        raise KeyError(f"record {ordinal} has no {cfg.text_field!r} field (data.text_field)")
    text, fixed = _safe_text(record[cfg.text_field])
    given_id = record.get(cfg.id_field)
    meta = {k: v for k, v in record.items() if k not in (cfg.text_field, cfg.id_field)}
    meta_json = json.dumps(meta, sort_keys=True, default=str, ensure_ascii=False) if meta else ""
    return {"id": str(given_id) if given_id is not None else derived_id(path, ordinal, text), "text": text,
            "source": path, "meta": _safe_text(meta_json)[0], "repaired": repaired or fixed, "read_error": ""}


def _read_jsonl(stream, path: str, cfg: DataConfig) -> Iterator[dict]:
    for ordinal, line in enumerate(stream):
        if not line.strip():
            continue
        text, repaired = decode(line)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {ordinal + 1} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {ordinal + 1} is not a JSON object")  # noqa: TRY004 - bad data, not a bug
        yield _doc(record, path, ordinal, cfg, repaired)


def _read_parquet(fs, fs_path: str, path: str, cfg: DataConfig) -> Iterator[dict]:
    ordinal = 0
    with fs.open_input_file(fs_path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_DOCS):
            for record in batch.to_pylist():
                yield _doc(record, path, ordinal, cfg, False)
                ordinal += 1


def _read_whole(stream, cfg: DataConfig) -> bytes:
    """Files that are one document are read whole: cap the bytes read (after decompression, so a small archive
    that inflates to gigabytes fails too) instead of letting one file exhaust a worker's memory."""
    cap = int(cfg.max_text_file_mb * 1024 * 1024)
    raw = stream.read(cap + 1)
    if len(raw) > cap:
        raise ValueError(f"more than {cfg.max_text_file_mb:g} MiB of text in one file (data.max_text_file_mb; "
                         "split it, or use .jsonl with one document per line)")
    return raw


def _read_builtin(fs, fs_path: str, kind: str, path: str, root: str, cfg: DataConfig):
    with fs.open_input_stream(fs_path) as stream:
        raw = _read_whole(stream, cfg)
    for ordinal, text in enumerate(extract(raw, kind, path, root, cfg.builtin)):
        yield {"id": derived_id(path, ordinal, text), "text": text, "source": path, "meta": "",
               "repaired": False, "read_error": ""}


def read_file(path: str, kind: str, root: str, cfg: DataConfig) -> Iterator[dict]:
    """Documents of one input file (rows with COLUMNS)."""
    fs, fs_path = _filesystem(path)
    _, compression = _split_suffixes(path)
    if kind == "parquet":
        yield from _read_parquet(fs, fs_path, path, cfg)
    elif kind == "jsonl":
        with fs.open_input_stream(fs_path, compression=compression) as stream:
            # pyarrow streams have no line iteration: buffer them as a binary file object
            yield from _read_jsonl(io.BufferedReader(stream, buffer_size=1 << 20), path, cfg)
    elif kind == "text":
        with fs.open_input_stream(fs_path, compression=compression) as stream:
            text, repaired = decode(_read_whole(stream, cfg))
        yield {"id": derived_id(path, 0, text), "text": text, "source": path, "meta": "",
               "repaired": repaired, "read_error": ""}
    else:
        yield from _read_builtin(fs, fs_path, kind, path, root, cfg)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {c: [r[c] for r in rows] for c in COLUMNS}


def read_files_batch(batch: dict, cfg: DataConfig) -> Iterator[dict[str, list]]:
    """Ray Data ``map_batches`` UDF: file rows in, batches of document rows out (streamed)."""
    for path, kind, root in zip(batch["path"], batch["kind"], batch["root"]):
        rows: list[dict] = []
        try:
            for row in read_file(str(path), str(kind), str(root), cfg):
                rows.append(row)
                if len(rows) >= BATCH_DOCS:
                    yield _columns(rows)
                    rows = []
        except Exception as exc:  # any failure of one file is reported with that file's name
            message = f"{path}: {type(exc).__name__}: {exc}"
            if cfg.on_error == "fail":
                raise CorpusReadError(message) from exc
            # skip: the documents read before the failure are kept; the error row is recorded in stats.json
            rows.append({"id": derived_id(str(path), -1, message), "text": "", "source": str(path), "meta": "",
                         "repaired": False, "read_error": message})
        if rows:
            yield _columns(rows)
