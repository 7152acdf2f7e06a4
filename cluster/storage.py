"""Where run directories live: a local (or shared-filesystem) path as ``pathlib.Path``, an object-store URI
(``s3://bucket/runs/x``, ``gs://...``) as ``ObjectPath``.

``ObjectPath`` offers the part of ``Path``'s API the data and pretrain stages use (``/``, ``exists``,
``read_text``, ``glob``, ...) over pyarrow's filesystems, so stage code reads the same for both; pyarrow is the
one filesystem layer (Ray Data and Ray Train resolve the same URIs with it). Hand-written because pyarrow has
filesystems but no path object, and fsspec's would be a second layer beside it.

Object stores have no rename of directories and no append: a stage writes its files in place and publishes
them with a marker written last (the data manifest, a model's ``config.json``); a single object PUT is atomic.
Credentials and endpoints come from the environment pyarrow reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
..., ``GOOGLE_APPLICATION_CREDENTIALS``), on the driver and, through the runtime env, on the workers.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs

# "s3://b/x", and "s3:/b/x" (what pathlib makes of it): any scheme, so nothing becomes a local folder "s3:".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
# What the workers need to reach the same object store as the driver (passed through Ray's runtime env).
# Secrets travel only to a local cluster: a runtime env is readable by anyone who can read the Jobs API, so the
# nodes of a remote cluster carry their own credentials (instance role, pod env, `raylm submit --cluster-env`).
STORAGE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                    "AWS_EC2_METADATA_DISABLED", "STORAGE_EMULATOR_HOST")
STORAGE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_uri(path) -> bool:
    """True for an object-store location (``file://`` URIs are local paths)."""
    return isinstance(path, ObjectPath) or (bool(_URI.match(str(path))) and not str(path).startswith("file:"))


def location(path: str | os.PathLike) -> Path | ObjectPath:
    """``Path`` for local paths (``file://`` stripped), ``ObjectPath`` for object-store URIs."""
    if isinstance(path, ObjectPath):
        return path
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return ObjectPath(text) if is_uri(text) else Path(text).expanduser()


@lru_cache(maxsize=16)
def _filesystem(scheme_and_bucket: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(scheme_and_bucket)[0]


class ObjectPath:
    """An object in (or a prefix of) a bucket, named by its URI. Picklable: only the URI travels."""

    __slots__ = ("uri",)

    def __init__(self, uri: str):
        if "://" not in uri:  # "s3:/b/x" from a str(Path(...)) of a URI
            scheme, rest = uri.split(":", 1)
            uri = f"{scheme}://{rest.lstrip('/')}"
        self.uri = uri.rstrip("/")

    def __reduce__(self):
        return ObjectPath, (self.uri,)

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def path(self) -> str:
        """The path inside the filesystem: ``bucket/key``."""
        return self.uri.split("://", 1)[1]

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(f"{self.scheme}://{self.path.split('/', 1)[0]}")

    def __truediv__(self, other) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __lt__(self, other: ObjectPath) -> bool:
        return self.uri < other.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0]) if "/" in self.path else self

    def resolve(self) -> ObjectPath:
        return self

    expanduser = resolve

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self._info().size)

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        pass  # object stores have prefixes, not directories: a key's "folders" exist once it is written

    def open(self, mode: str = "rb"):
        if mode == "rb":
            return self.fs.open_input_file(self.path)
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"{self}: mode {mode!r} (object storage opens 'rb' or 'wb')")

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as fh:  # one PUT on close: readers see the old object or the whole new one
            fh.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.is_file():
            return
        self.fs.delete_file(self.path)

    def iterdir(self) -> Iterator[ObjectPath]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in infos:
            yield self / info.base_name

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """``Path.glob`` for patterns without ``**`` (one listing per pattern part)."""
        current = [self]
        for part in pattern.split("/"):
            current = [c for parent in current for c in parent.iterdir() if fnmatch.fnmatchcase(c.name, part)]
        yield from current

    def files(self) -> Iterator[ObjectPath]:
        """Every object under this prefix (one listing)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File:
                yield ObjectPath(f"{self.scheme}://{info.path}")


def arrow_target(path) -> tuple[pafs.FileSystem | None, str]:
    """``(filesystem, path)`` for pyarrow calls that take ``filesystem=`` (None: pyarrow's local default)."""
    where = location(path)
    return (where.fs, where.path) if isinstance(where, ObjectPath) else (None, str(where))


def remove_tree(path) -> None:
    where = location(path)
    if isinstance(where, ObjectPath):
        if where.exists():
            where.fs.delete_dir(where.path)
    else:
        shutil.rmtree(where, ignore_errors=True)


def move(src, dst) -> None:
    """Rename one file (a copy and a delete on object stores)."""
    src, dst = location(src), location(dst)
    if isinstance(src, ObjectPath):
        src.fs.move(src.path, dst.path)
    else:
        Path(src).replace(dst)


def upload_dir(local: Path, dest: ObjectPath, last: tuple[str, ...] = ()) -> None:
    """Copy a local directory's files under ``dest``; the files named in ``last`` go last (they publish it)."""
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()),
                   key=lambda p: (p.relative_to(local).as_posix() in last, p.as_posix()))
    for path in files:
        (dest / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())


@contextmanager
def local_copy(path) -> Iterator[Path]:
    """A local directory holding ``path``'s files (the path itself when it is local): for libraries that read
    only local folders (transformers' ``from_pretrained``)."""
    where = location(path)
    if not isinstance(where, ObjectPath):
        yield where
        return
    with tempfile.TemporaryDirectory(prefix="raylm-copy-") as tmp:
        for obj in where.files():
            target = Path(tmp, obj.path[len(where.path) + 1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(obj.read_bytes())
        yield Path(tmp)


def storage_env(secrets: bool) -> dict[str, str]:
    """The storage settings of this process's environment (and its credentials when ``secrets``), for the
    workers' runtime env."""
    names = STORAGE_SETTINGS + (STORAGE_SECRETS if secrets else ())
    return {k: os.environ[k] for k in names if k in os.environ}
