"""Checkpoints of a whole PPO run: policy and critic DeepSpeed states (weights, optimizer, RNG; every replica
writes its own shard) plus the driver's state (iteration, prompt sampler, KL coefficient).

Layout under ``<run-dir>/ppo/checkpoints/``: ``policy/<tag>/``, ``critic/<tag>/``, ``driver/<tag>.json`` and
``latest.json``. ``latest.json`` is written last (atomically), so it only ever names a complete checkpoint;
a crash mid-save leaves the previous one in force.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cluster.config import atomic_write_json


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:06d}"


class PPOCheckpoints:
    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def latest(self) -> dict | None:
        """The driver state of the newest complete checkpoint (with its ``tag``), or None."""
        marker = self.root / "latest.json"
        if not marker.exists():
            return None
        tag = json.loads(marker.read_text())["tag"]
        return {**json.loads((self.root / "driver" / f"{tag}.json").read_text()), "tag": tag}

    def save(self, trainer, iteration: int, driver_state: dict) -> str:
        tag = tag_for(iteration)
        trainer.save(self.root, tag)
        atomic_write_json(self.root / "driver" / f"{tag}.json", {"iteration": iteration, **driver_state})
        atomic_write_json(self.root / "latest.json", {"tag": tag})
        self._prune(keep_tag=tag)
        return tag

    def restore(self, trainer) -> dict | None:
        state = self.latest()
        if state is not None:
            trainer.load(self.root, state["tag"])
        return state

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.stem for p in (self.root / "driver").glob("iter_*.json"))
        for old in tags[:-self.keep] if self.keep else []:
            if old == keep_tag:
                continue
            for role in ("policy", "critic"):
                shutil.rmtree(self.root / role / old, ignore_errors=True)
            (self.root / "driver" / f"{old}.json").unlink(missing_ok=True)
