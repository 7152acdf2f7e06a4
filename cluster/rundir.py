"""Run directory layout (``<run-dir>/<stage>/...``) and the per-stage metrics log."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ConfigError

STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval", "report", "serve")
ALIGNED_STAGES = ("ppo", "dpo")
MODEL_STAGES = (*ALIGNED_STAGES, "sft", "pretrain")  # newest first: which trained model a later step picks up


# "s3://b/x", and "s3:/b/x" (what pathlib makes of it): any scheme, so nothing becomes a local folder "s3:".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def check_local(path: str | Path) -> None:
    """Run directories are local or shared-filesystem paths: every stage reads and writes them with plain file
    I/O, so an object-store URI would silently become a local folder named after its scheme."""
    if _URI.match(str(path)):
        raise ConfigError(f"--run-dir {path}: run directories on object storage are not supported; use a "
                          f"filesystem path every node can reach (NFS, a ReadWriteMany volume, or the bucket "
                          f"mounted with s3fs/gcsfuse). Inputs (--input) may be s3:// or gs:// URIs.")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        check_local(path)
        root = Path(path).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def model_dir(self, stage: str) -> Path:
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
    """Appends one JSON object per step/eval to ``metrics.jsonl``; each line is flushed whole."""

    def __init__(self, stage_dir: Path, tensorboard: bool = True):
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
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
