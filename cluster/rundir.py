"""Run directory layout (``<run-dir>/<stage>/...``) and the per-stage metrics log."""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow.fs import FileType

from cluster.config import ConfigError
from cluster.storage import ObjectPath, is_uri, location

STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval", "report", "serve")
ALIGNED_STAGES = ("ppo", "dpo")
MODEL_STAGES = (*ALIGNED_STAGES, "sft", "pretrain")  # newest first: which trained model a later step picks up
OBJECT_STORE_STAGES = ("data", "pretrain")  # the stages whose every read and write goes through cluster.storage


def check_stages(path: str | Path, stages: Iterable[str]) -> None:
    """An object-store run dir only for the stages that read and write it through pyarrow's filesystems: the
    others use plain file I/O, and a URI would silently become a local folder named after its scheme."""
    if not is_uri(path):
        return
    for stage in stages:
        if stage not in OBJECT_STORE_STAGES:
            raise ConfigError(f"--run-dir {path}: `raylm {stage}` does not support run directories on object "
                              f"storage (only {', '.join(OBJECT_STORE_STAGES)} do); use a filesystem path every "
                              "node can reach (NFS, a ReadWriteMany volume, or the bucket mounted with "
                              "s3fs/gcsfuse)")


def check_bucket(root: ObjectPath) -> None:
    """Fail before any work when the bucket is missing or unreachable (credentials, endpoint), naming both."""
    bucket = root.path.split("/", 1)[0]
    try:
        missing = root.fs.get_file_info(bucket).type == FileType.NotFound
    except OSError as exc:
        raise ConfigError(f"--run-dir {root}: cannot reach bucket {bucket!r}: {exc}") from None
    if missing:
        raise ConfigError(f"--run-dir {root}: bucket {bucket!r} does not exist (raylm creates no buckets)")


@dataclass(frozen=True)
class RunDir:
    root: Path | ObjectPath

    @classmethod
    def create(cls, path: str | Path, stages: Iterable[str] = STAGES) -> RunDir:
        check_stages(path, stages)
        root = location(path).resolve()
        if isinstance(root, ObjectPath):
            check_bucket(root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def stage(self, name: str) -> Path | ObjectPath:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def model_dir(self, stage: str) -> Path | ObjectPath:
        """Where a training stage writes its final Hugging Face model."""
        return self.root / stage / "model"

    def latest_model(self, alignment: str = "ppo") -> Path | None:
        """The most trained model: the ``alignment`` stage's (ppo or dpo) first, the other aligned one, then
        sft, then pretrain."""
        for stage in sorted(MODEL_STAGES, key=lambda s: s != alignment):
            path = self.model_dir(stage)
            if (path / "config.json").exists():
                return path
        return None

    def require_model(self, stage: str, needed_by: str) -> Path:
        path = self.model_dir(stage)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{needed_by} needs the {stage} model at {path}; run `raylm {stage}` on this run dir first")
        return path


class MetricsLog:
    """Appends one JSON object per step/eval to ``metrics.jsonl``; each line is flushed whole.

    On object storage (no append) the lines go to a local file and the whole file is uploaded at most every
    ``upload_every_s`` seconds and on ``close``; no TensorBoard events there (they too would need appends)."""

    def __init__(self, stage_dir: Path | ObjectPath, tensorboard: bool = True, upload_every_s: float = 30.0):
        stage_dir = location(stage_dir)
        self.remote: ObjectPath | None = None
        if isinstance(stage_dir, ObjectPath):
            self.remote, self.upload_every_s, self._uploaded = stage_dir / "metrics.jsonl", upload_every_s, 0.0
            self._tmp = tempfile.TemporaryDirectory(prefix="raylm-metrics-")
            stage_dir = Path(self._tmp.name)
            if self.remote.is_file():  # a resumed run continues the same log
                (stage_dir / "metrics.jsonl").write_bytes(self.remote.read_bytes())
            tensorboard = False
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(stage_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, sort_keys=True, default=float) + "\n"
        # O_APPEND makes each single write atomic with respect to other appenders.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if self.remote is not None and time.monotonic() - self._uploaded >= self.upload_every_s:
            self._upload()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def _upload(self) -> None:
        self.remote.write_bytes(self.path.read_bytes())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.remote is not None:
            self._upload()


def read_metrics(stage_dir: Path | ObjectPath) -> list[dict]:
    path = location(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
