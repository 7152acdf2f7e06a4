"""The console of a run: a line per stage as it starts and ends, and one progress display while it runs.

The display reads the stage's own ``metrics.jsonl`` (one record per training step or PPO iteration, written by
rank 0 or the PPO driver) on a thread of this process, so stages need no progress code and Ray workers print
nothing. In a terminal it is a rich bar with rate and ETA; otherwise (``make run > log``, a Ray job) one status
line every ``RAYLM_PROGRESS_INTERVAL`` seconds (default 30), so a long stage is never silent.

Ray's own output (Ray Data's progress lines, driver-side Ray/Train/Serve logs, worker logs) goes to
``<run>/logs/`` instead of the console; ``--ray-logs`` or ``RAYLM_RAY_LOGS=1`` brings it back. Errors stay
on the console: a failing stage raises, and Ray's error-level records still print.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Self

RAY_LOGS_ENV = "RAYLM_RAY_LOGS"
INTERVAL_ENV = "RAYLM_PROGRESS_INTERVAL"
# Stages that run until stopped (the server): a heartbeat would only count the hours.
OPEN_ENDED = {"serve"}
# Metrics shown beside the step count, the first present wins per slot.
SHOWN = ("loss", "val_loss", "reward_mean", "kl")


def ray_logs_on_console() -> bool:
    return os.environ.get(RAY_LOGS_ENV, "").strip() not in ("", "0", "false")


def route_ray_logs(log_dir: Path) -> Path | None:
    """Send this process's Ray logs to ``log_dir/ray-driver.log`` and keep only their errors on the console.

    Returns the log file, or None when ``RAYLM_RAY_LOGS`` asks for Ray's console output.
    """
    if ray_logs_on_console():
        return None
    import ray  # installs the "ray" console handler that is lowered below
    import ray.data  # installs the "ray.data" handlers, with propagate off

    # Ray Data's progress bars: outside a terminal, ~7 lines per running dataset every 10 s (most of a run's log).
    ray.data.DataContext.get_current().enable_progress_bars = False

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ray-driver.log"
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.setLevel(logging.INFO)  # Ray Data logs DEBUG too (1.6 MB for one data stage); its own file has it
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            # Ray's own console handlers only: others found here (pytest's caplog puts its handler on "ray" too)
            # are not ours to quiet
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and type(handler).__module__.startswith("ray.")):
                handler.setLevel(logging.ERROR)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
            logger.addHandler(to_file)
    return path


def link_worker_logs(log_dir: Path) -> Path | None:
    """After ``ray.init``: driver records from INFO up to the file (``ray.init`` set the "ray" logger to
    WARNING, for the console that now shows only errors), and ``<run>/logs/ray-session``, a link to this Ray
    session's log folder (workers, raylet, Ray Data), which Ray writes on the head node; None when this driver
    joined a cluster whose logs are elsewhere."""
    import ray

    logging.getLogger("ray").setLevel(logging.INFO)
    node = ray._private.worker._global_node  # Ray has no public getter for the session dir of a driver
    if node is None:
        return None
    target = Path(node.get_session_dir_path()) / "logs"
    if not target.is_dir():
        return None
    link = Path(log_dir) / "ray-session"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def step_total(section) -> int | None:
    """The step count a stage runs to in this invocation: training steps, or PPO iterations."""
    return (getattr(section, "stop_at_step", None) or getattr(section, "max_steps", None)
            or getattr(section, "iterations", None))


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsTail:
    """New records of a ``metrics.jsonl`` since this object was made (a resumed stage appends)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


class StageProgress:
    """One stage's display, fed by its metrics file; ``terminal`` picks the bar or the periodic line."""

    def __init__(self, label: str, metrics: Path | None, total: int | None, stream=None,
                 terminal: bool | None = None, interval: float | None = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.interval = float(os.environ.get(INTERVAL_ENV, "30")) if interval is None else interval
        # an object-store run dir's metrics are uploaded in whole files now and then: no tail, a heartbeat line
        self.tail = MetricsTail(metrics) if isinstance(metrics, (str, os.PathLike)) else None
        self.step: int | None = None
        self.first: tuple[float, int] | None = None  # (time, step) of the first record seen: the rate's origin
        self.last_at = 0.0
        self.shown: dict[str, float] = {}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def poll(self) -> None:
        for record in self.tail.read() if self.tail else []:
            if "step" not in record:
                continue
            self.step = int(record["step"])
            # The record's own time (MetricsLog writes one): several steps can arrive in one poll.
            at = float(record.get("time") or time.time())
            self.first = self.first or (at, self.step)
            self.last_at = at
            for key in SHOWN:
                if isinstance(record.get(key), (int, float)):
                    self.shown[key] = record[key]

    def rate(self) -> float | None:
        if self.first is None or self.step is None or self.step <= self.first[1]:
            return None
        return (self.step - self.first[1]) / max(1e-9, self.last_at - self.first[0])

    def status(self) -> str:
        elapsed = _duration(time.monotonic() - self.t0)
        if self.step is None:
            waiting = f"0/{self.total} steps, " if self.total else ""
            return f"{self.label}: running, {waiting}{elapsed} elapsed"
        parts = [f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)" if self.total
                 else f"step {self.step}"]
        rate = self.rate()
        if rate:
            parts.append(f"{rate:.2f} step/s")
            if self.total:
                parts.append(f"ETA {_duration((self.total - self.step) / rate)}")
        parts += [f"{k} {v:.4g}" for k, v in self.shown.items()]
        return f"{self.label}: {', '.join(parts)}, {elapsed} elapsed"

    def _line_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
            print(self.status(), file=self.stream, flush=True)

    def _bar_loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()
            fields = ", ".join(f"{k} {v:.4g}" for k, v in self.shown.items())
            self._bar.update(self._task, completed=self.step or 0, fields=fields)

    def __enter__(self) -> Self:
        if self.terminal:
            self._bar = _rich_bar(self.stream)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, fields="")
            target = self._bar_loop
        else:
            target = self._line_loop
        self._thread = threading.Thread(target=target, name=f"progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.stop()


def _rich_bar(stream):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class StepRate(ProgressColumn):  # rich's speed columns are for bytes
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} step/s" if task.speed else "")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), StepRate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"),
                    console=Console(file=stream), transient=True, speed_estimate_period=120)


class PipelineProgress:
    """The run's outline: ``[i/n] stage: started`` / ``done in S s (summary)`` around each stage's display."""

    def __init__(self, stages: list[str], stream=None, recipe=None, run_dir=None):
        self.stages = stages
        self.stream = stream or sys.stderr
        self.recipe, self.run_dir = recipe, run_dir
        self.times: dict[str, float] = {}
        self._display: StageProgress | None = None

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self._print(f"raylm: {len(self.stages)} stage(s): {' -> '.join(self.stages)}")
        return self

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _tag(self, stage: str) -> str:
        return f"[{self.stages.index(stage) + 1}/{len(self.stages)}] {stage}"

    def start(self, stage: str) -> None:
        self._print(f"{self._tag(stage)}: started")
        if stage in OPEN_ENDED or self.run_dir is None:
            return
        total = step_total(getattr(self.recipe, stage, None))
        self._display = StageProgress(self._tag(stage), self.run_dir.stage(stage) / "metrics.jsonl", total,
                                      stream=self.stream).__enter__()

    def _end_display(self) -> None:
        if self._display is not None:
            self._display.__exit__(None, None, None)
            self._display = None

    def done(self, stage: str, seconds: float, summary: dict) -> None:
        self._end_display()
        self.times[stage] = seconds
        brief = ", ".join(f"{k}={v}" for k, v in list(summary.items())[:6])
        self._print(f"{self._tag(stage)}: done in {seconds:.1f}s" + (f" ({brief})" if brief else ""))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._end_display()
        total = time.perf_counter() - self.t0
        split = ", ".join(f"{s} {t:.0f}s" for s, t in self.times.items())
        status = "failed" if exc_type else "finished"
        self._print(f"raylm: {status} after {total:.1f}s" + (f" ({split})" if split else ""))
