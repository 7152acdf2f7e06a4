"""One progress display for a pipeline run: a line per stage as it starts and ends, with its wall time.

Stages show their own inner progress (Ray Data's per-operator bars, step counters) between these lines.
"""
from __future__ import annotations

import sys
import time
from typing import Self


class PipelineProgress:
    def __init__(self, stages: list[str], stream=None):
        self.stages = stages
        self.stream = stream or sys.stderr
        self.times: dict[str, float] = {}

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self._print(f"raylm: {len(self.stages)} stage(s): {' -> '.join(self.stages)}")
        return self

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, stage: str) -> None:
        i = self.stages.index(stage) + 1
        self._print(f"[{i}/{len(self.stages)}] {stage}: started")

    def done(self, stage: str, seconds: float, summary: dict) -> None:
        i = self.stages.index(stage) + 1
        self.times[stage] = seconds
        brief = ", ".join(f"{k}={v}" for k, v in list(summary.items())[:6])
        self._print(f"[{i}/{len(self.stages)}] {stage}: done in {seconds:.1f}s" + (f" ({brief})" if brief else ""))

    def __exit__(self, exc_type, exc, tb) -> None:
        total = time.perf_counter() - self.t0
        split = ", ".join(f"{s} {t:.0f}s" for s, t in self.times.items())
        status = "failed" if exc_type else "finished"
        self._print(f"raylm: {status} after {total:.1f}s" + (f" ({split})" if split else ""))
