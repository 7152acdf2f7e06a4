"""The data stage's directory: ``documents/``, ``dropped/``, ``shards/``, ``tokenizer/``, ``stats.json``.

A rerun first removes the manifest (so the data reads as incomplete from the first moment), then the rest.
Local directories are written under a temp name and renamed into place when complete. Object stores cannot
rename a directory: there each one is written in place, and the manifest (written last) publishes the lot.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.storage import ObjectPath, remove_tree
from pipelines.data.shards import MANIFEST


@dataclass(frozen=True)
class DataOutputs:
    root: Path | ObjectPath

    @property
    def documents(self) -> Path | ObjectPath:
        return self.root / "documents"

    @property
    def dropped(self) -> Path | ObjectPath:
        return self.root / "dropped"

    @property
    def shards(self) -> Path | ObjectPath:
        return self.root / "shards"

    @property
    def manifest(self) -> Path | ObjectPath:
        return self.shards / MANIFEST

    @property
    def stats(self) -> Path | ObjectPath:
        return self.root / "stats.json"

    @property
    def in_place(self) -> bool:
        return isinstance(self.root, ObjectPath)

    def reset(self) -> None:
        """Forget a previous run's outputs (never the tokenizer: it is reused when present)."""
        self.manifest.unlink(missing_ok=True)
        self.stats.unlink(missing_ok=True)
        for path in (self.shards, self.documents, self.dropped):
            remove_tree(path)
        for tmp in self.root.glob(".tmp-*"):
            remove_tree(tmp)
        self.shards.mkdir(parents=True)

    def staging(self, name: str) -> Path | ObjectPath:
        return self.root / name if self.in_place else self.root / f".tmp-{name}"

    def publish(self, name: str) -> Path | ObjectPath:
        """Move the completed ``.tmp-<name>`` directory to ``<name>`` (already there on object storage)."""
        final = self.root / name
        if self.in_place:
            return final
        remove_tree(final)
        self.staging(name).replace(final)
        return final
