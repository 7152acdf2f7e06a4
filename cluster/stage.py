"""What the CLI hands to a stage: the validated recipe, the run directory and the stage's own options."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from cluster.recipe import Recipe
from cluster.rundir import RunDir


class StageNotBuilt(RuntimeError):
    """Raised for a stage whose implementation has not landed yet."""


@dataclass
class StageContext:
    recipe: Recipe
    run_dir: RunDir
    address: str | None = None  # the cluster the CLI joined (--address); None: RAY_ADDRESS or a local one it started
    options: dict[str, Any] = field(default_factory=dict)  # stage-specific CLI flags (e.g. serve's block)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir.stage(name)

    def ray(self):
        """The Ray runtime the CLI started before any stage (``cluster.runtime.init_ray``, its one owner)."""
        from cluster.runtime import connected_ray

        return connected_ray()


@dataclass
class StageResult:
    stage: str
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


class Timer:
    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
