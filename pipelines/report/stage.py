"""``raylm report [RUN_DIR]`` and the report step of ``raylm run`` (after eval, before serve): write
``<run>/report/report.html`` (self-contained, plots included) and ``<run>/report/report.md``, atomically.

It only reads the run directory (no Ray, no models): it can be rerun at any time, on any run, also one that
stopped early; what the run did not reach shows as "not run".
"""
from __future__ import annotations

from pathlib import Path

from cluster.config import atomic_write_text
from cluster.stage import StageContext
from pipelines.report.collect import collect
from pipelines.report.render import render_html, render_markdown
from pipelines.report.sections import build_sections

HTML, MARKDOWN = "report.html", "report.md"


def build_report(run_dir: str | Path) -> dict:
    """Write both files of ``run_dir``'s report; return their paths (and the eval results' path when there)."""
    run = Path(run_dir).expanduser().resolve()
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run directory not found")
    facts = collect(run)
    sections = build_sections(facts)
    out = run / "report"
    atomic_write_text(out / HTML, render_html(run.name, str(run), sections))
    atomic_write_text(out / MARKDOWN, render_markdown(run.name, str(run), sections))
    results = run / "eval" / "results.json"
    return {"report": str(out / HTML), "markdown": str(out / MARKDOWN),
            "eval_results": str(results) if results.is_file() else None,
            "not_run": [s["id"] for s in sections if s["missing"]]}


def print_paths(paths: dict) -> None:
    print(f"raylm report: {paths['report']}\n  markdown:     {paths['markdown']}\n  eval results: "
          f"{paths['eval_results'] or 'not run'}", flush=True)


def needs_ray(ctx: StageContext) -> bool:
    return False  # the report reads the run directory's files only


def run(ctx: StageContext) -> dict:
    paths = build_report(ctx.run_dir.root)
    print_paths(paths)
    return {"report": paths["report"], "eval_results": paths["eval_results"]}


def report_command(run_dir: str | Path) -> int:
    print_paths(build_report(run_dir))
    return 0
