"""The built-in corpus: real documentation found on this machine, read without importing anything.

Three kinds of files, listed here and turned into documents by ``extract`` on Ray workers:
- ``python``: modules of the standard library, then of the installed packages: the module docstring and
  every public class/function/method docstring, each headed by its qualified name and signature
  (``json.dumps(obj, *, skipkeys=False, ...)``), parsed with ``ast`` (never imported: no side effects).
- ``metadata``: the long description (README) in each installed distribution's METADATA.
- ``license``: LICENSE/COPYING/NOTICE files shipped in ``*.dist-info`` (the natural exact/near duplicates).
"""
from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from pathlib import Path

from cluster.schemas.data import BuiltinCorpusConfig

_SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "idlelib", "turtledemo", "lib2to3", "site-packages",
              "ensurepip", "_vendor_tests", "examples", "benchmarks", "dist-packages"}
_LICENSE_PREFIXES = ("license", "licence", "copying", "notice", "authors")


def _python_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place: os.walk then never descends into tests, caches or nested site-packages
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                       and not d.endswith((".dist-info", ".egg-info", ".data"))]
        out.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def _spread(items: list, limit: int) -> list:
    """At most ``limit`` items taken evenly across the (sorted) list: every package gets a share."""
    if len(items) <= limit:
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def list_builtin_files(cfg: BuiltinCorpusConfig) -> list[dict]:
    """The files the built-in corpus reads, as ``{"path", "kind", "root"}`` rows, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    std_files = _python_files(stdlib)
    site_files = _python_files(site) if site.is_dir() else []
    budget = cfg.max_python_files
    chosen = [(p, stdlib) for p in _spread(std_files, budget)]
    chosen += [(p, site) for p in _spread(site_files, max(0, budget - len(chosen)))]
    rows = [{"path": str(p), "kind": "python", "root": str(root)} for p, root in chosen]
    package_docs = []
    for dist in sorted(site.glob("*.dist-info")) if site.is_dir() else []:
        if (dist / "METADATA").is_file():
            package_docs.append({"path": str(dist / "METADATA"), "kind": "metadata", "root": str(site)})
        for lic in sorted(p for p in dist.rglob("*") if p.is_file()):
            if lic.name.lower().startswith(_LICENSE_PREFIXES):
                package_docs.append({"path": str(lic), "kind": "license", "root": str(site)})
    return rows + _spread(package_docs, cfg.max_package_docs)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"({args})"


def docstring_sections(source: str, module: str) -> Iterator[str]:
    """Module docstring, then ``qualified.name(signature)`` + docstring for each public class/function/method."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    if doc:
        yield f"Module `{module}`\n\n{doc}"

    def visit(body, prefix: str) -> Iterator[str]:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            node_doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if node_doc:
                    yield f"class `{name}`\n\n{node_doc}"
                yield from visit(node.body, name)
            elif node_doc:
                yield f"`{name}{_signature(node)}`\n\n{node_doc}"

    yield from visit(tree.body, module)


def pack_sections(sections: Iterator[str], max_chars: int) -> Iterator[str]:
    """Join sections into documents of at most ``max_chars`` (a single longer section is cut)."""
    current: list[str] = []
    size = 0
    for section in sections:
        section = section[:max_chars]
        if current and size + 2 + len(section) > max_chars:  # 2: the blank line joining sections
            yield "\n\n".join(current)
            current, size = [], 0
        size += len(section) + (2 if current else 0)
        current.append(section)
    if current:
        yield "\n\n".join(current)


def metadata_description(raw: bytes) -> str:
    """The long description of a METADATA file: its body, or the Description header of old versions."""
    head, _, body = raw.partition(b"\n\n")
    if body.strip():
        return body.decode("utf-8", errors="replace")
    headers = BytesHeaderParser().parsebytes(head + b"\n\n")
    return str(headers.get("Description", ""))


def extract(raw: bytes, kind: str, path: str, root: str, cfg: BuiltinCorpusConfig) -> Iterator[str]:
    """Documents of one built-in file (raw bytes in, texts out)."""
    if kind == "python":
        source = raw.decode("utf-8", errors="replace")
        try:
            sections = list(docstring_sections(source, module_name(Path(path), Path(root))))
        except (SyntaxError, ValueError, RecursionError):
            return  # a file for another Python version (e.g. a py2 vendored copy): no docstrings to read
        yield from pack_sections(iter(sections), cfg.max_doc_chars)
    elif kind == "metadata":
        yield from pack_sections(iter([metadata_description(raw)]), cfg.max_doc_chars)
    elif kind == "license":
        yield from pack_sections(iter([raw.decode("utf-8", errors="replace")]), cfg.max_doc_chars)
    else:
        raise ValueError(f"unknown built-in file kind {kind!r}")
