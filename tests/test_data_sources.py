"""Input readers (no Ray needed: the reader is a plain generator) and the built-in corpus extraction."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cluster.schemas.data import BuiltinCorpusConfig, DataConfig
from pipelines.data.builtin_corpus import (
    docstring_sections,
    extract,
    list_builtin_files,
    metadata_description,
    pack_sections,
)
from pipelines.data.sources import CorpusReadError, list_input_files, read_file, read_files_batch

LINES = [{"id": "a", "text": "first doc", "lang": "en"}, {"text": "second doc", "url": "http://x"}]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _read(path, cfg=None):
    kind = list_input_files([str(path)])[0]["kind"]
    return list(read_file(str(path), kind, "", cfg or DataConfig()))


@pytest.mark.parametrize("name, encode", [
    ("c.jsonl", lambda b: b), ("c.jsonl.gz", gzip.compress), ("c.ndjson.zst", zstandard.compress),
])
def test_jsonl_plain_and_compressed(tmp_path, name, encode):
    path = tmp_path / name
    path.write_bytes(encode(_jsonl(LINES)))
    docs = _read(path)
    assert [d["text"] for d in docs] == ["first doc", "second doc"]
    assert docs[0]["id"] == "a" and json.loads(docs[0]["meta"]) == {"lang": "en"}
    assert len(docs[1]["id"]) == 20 and docs[1]["id"] == _read(path)[1]["id"]  # derived, stable
    assert json.loads(docs[1]["meta"]) == {"url": "http://x"} and docs[1]["source"] == str(path)


def test_parquet_and_text(tmp_path):
    pq.write_table(pa.table({"body": ["p1", "p2"], "id": [1, 2]}), tmp_path / "c.parquet")
    cfg = DataConfig(text_field="body")
    assert [(d["id"], d["text"]) for d in _read(tmp_path / "c.parquet", cfg)] == [("1", "p1"), ("2", "p2")]
    (tmp_path / "note.txt").write_bytes(b"a whole file is one document\nline two")
    assert [d["text"] for d in _read(tmp_path / "note.txt")] == ["a whole file is one document\nline two"]


def test_invalid_utf8_is_repaired_not_fatal(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 \xff ok"}\n{"text": "lone \\ud800 surrogate"}\n')
    docs = _read(path)
    assert all(d["repaired"] for d in docs)
    assert "\ufffd" in docs[0]["text"] and docs[1]["text"].encode("utf-8")


def test_directory_listing_and_input_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_bytes(_jsonl(LINES))
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    (tmp_path / ".hidden.jsonl").write_text("")
    rows = list_input_files([str(tmp_path)])
    assert [(r["path"].rsplit("/", 1)[-1], r["kind"]) for r in rows] == [("b.txt", "text"), ("a.jsonl", "jsonl")]
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        list_input_files([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="skip.bin: unsupported file type"):
        list_input_files([str(tmp_path / "skip.bin")])


def test_bad_file_fails_with_its_name_or_is_recorded(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"txt": "no text field"}\n')
    batch = {"path": [str(path)], "kind": ["jsonl"], "root": [""]}
    with pytest.raises(CorpusReadError, match=r"broken\.jsonl: KeyError: .*record 1 has no 'text' field"):
        list(read_files_batch(batch, DataConfig()))
    out = list(read_files_batch(batch, DataConfig(on_error="skip")))
    rows = [dict(zip(out[0], vals)) for vals in zip(*out[0].values())]
    assert [r["text"] for r in rows] == ["good", ""] and "record 1" in rows[1]["read_error"]


@pytest.mark.parametrize("name, encode", [("big.txt", lambda b: b), ("bomb.txt.gz", gzip.compress)])
def test_text_file_over_the_cap_fails_with_its_name(tmp_path, name, encode):
    path = tmp_path / name
    path.write_bytes(encode(b"word " * 60_000))  # 300,000 bytes once decompressed; the .gz is ~1 KB
    batch = {"path": [str(path)], "kind": ["text"], "root": [""]}
    with pytest.raises(CorpusReadError, match=rf"{name}: ValueError: more than 0.25 MiB of text in one file "
                                              r"\(data.max_text_file_mb"):
        list(read_files_batch(batch, DataConfig(max_text_file_mb=0.25)))
    assert len(_read(path, DataConfig(max_text_file_mb=0.3))[0]["text"]) == 300_000


SOURCE = '''"""Module doc."""
import os


def dumps(obj, *, indent=None):
    """Serialize obj to a JSON formatted str."""


def _private():
    """Hidden."""


class Encoder:
    """Extensible JSON encoder."""

    def encode(self, o):
        """Return a JSON string."""
'''


def test_docstring_sections_name_every_public_api():
    sections = list(docstring_sections(SOURCE, "json"))
    assert sections == [
        "Module `json`\n\nModule doc.",
        "`json.dumps(obj, *, indent=None)`\n\nSerialize obj to a JSON formatted str.",
        "class `json.Encoder`\n\nExtensible JSON encoder.",
        "`json.Encoder.encode(self, o)`\n\nReturn a JSON string.",
    ]
    assert list(extract(b"def broken(:\n", "python", "/x/m.py", "/x", BuiltinCorpusConfig())) == []


def test_pack_sections_and_metadata():
    docs = list(pack_sections(iter(["a" * 6, "b" * 6, "c" * 30]), max_chars=15))
    assert docs == ["aaaaaa\n\nbbbbbb", "c" * 15]
    raw = b"Metadata-Version: 2.1\nName: pkg\n\n# pkg\n\nA package that does things.\n"
    assert metadata_description(raw).startswith("# pkg")


def test_builtin_listing_is_bounded_and_starts_with_the_standard_library():
    rows = list_builtin_files(BuiltinCorpusConfig(max_python_files=50, max_package_docs=10))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("python") == 50 and len(rows) <= 60
    assert "site-packages" not in rows[0]["path"]
    assert rows == list_builtin_files(BuiltinCorpusConfig(max_python_files=50, max_package_docs=10))


def test_uri_inputs_go_through_pyarrow_filesystems(tmp_path):
    # file:// takes the same code path as s3:// and gs:// (pyarrow.fs.FileSystem.from_uri)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(LINES)))
    rows = list_input_files([f"file://{tmp_path}/d"])
    assert [r["path"] for r in rows] == [f"file://{tmp_path}/d/a.jsonl.gz"]
    docs = list(read_file(rows[0]["path"], rows[0]["kind"], "", DataConfig()))
    assert [d["text"] for d in docs] == ["first doc", "second doc"]
