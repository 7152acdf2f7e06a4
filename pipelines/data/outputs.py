"""The data stage's directory: ``documents/``, ``dropped/``, ``shards/``, ``tokenizer/``, ``stats.json``.

A rerun first removes the manifest (so the data reads as incomplete from the first moment), then the rest.
Directories are written under a temp name and renamed into place when complete.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.shards import MANIFEST


@dataclass(frozen=True)
class DataOutputs:
    root: Path

    @property
    def documents(self) -> Path:
        return self.root / "documents"

    @property
    def dropped(self) -> Path:
        return self.root / "dropped"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.shards / MANIFEST

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    def reset(self) -> None:
        """Forget a previous run's outputs (never the tokenizer: it is reused when present)."""
        self.manifest.unlink(missing_ok=True)
        self.stats.unlink(missing_ok=True)
        for path in (self.shards, self.documents, self.dropped):
            shutil.rmtree(path, ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        self.shards.mkdir(parents=True)

    def staging(self, name: str) -> Path:
        return self.root / f".tmp-{name}"

    def publish(self, name: str) -> Path:
        """Move the completed ``.tmp-<name>`` directory to ``<name>``."""
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        self.staging(name).replace(final)
        return final
