"""The run report in a real browser: headless Chromium (Playwright) opens report.html of a tiny run directory
from disk, with the network cut off (it must stand alone), and every plot renders with its data; screenshots go
to test-artifacts/. No Ray, no model: seconds."""
from __future__ import annotations

import pytest
from browser_fixtures import browser  # noqa: F401 - fixture
from report_fixtures import make_report_run

from pipelines.report.stage import build_report

pytestmark = [pytest.mark.browser]

# Per plotly div: how many traces it drew and how many SVG marks (bars, funnel bars, line paths) they hold.
PLOT_STATS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(div => ({
  id: div.id,
  traces: div.querySelectorAll('g.trace').length,
  marks: div.querySelectorAll('g.trace path.point, g.trace path.js-line, g.trace path').length,
}))"""


def open_report(browser, run, artifacts_dir, name: str):  # noqa: F811
    build_report(run)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # load: every plot's script has run (a generous bound: ~18 s for 5 MB and 8 plots on 2 busy cores)
    page.goto((run / "report" / "report.html").as_uri(), wait_until="load", timeout=120_000)
    page.screenshot(path=str(artifacts_dir / f"{name}.png"), full_page=True)
    return context, page, errors


def test_report_renders_every_plot_offline_in_chromium(browser, tmp_path, artifacts_dir):  # noqa: F811
    run = make_report_run(tmp_path)
    context, page, errors = open_report(browser, run, artifacts_dir, "report")
    stats = {p["id"]: p for p in page.evaluate(PLOT_STATS)}
    expected = {f"plot-{n}" for n in ("funnel", "drops", "pretrain", "sft", "reward", "ppo", "timings", "eval")}
    assert set(stats) == expected
    for plot_id, s in stats.items():
        assert s["traces"] > 0 and s["marks"] > 0, f"{plot_id} drew nothing: {s}"
    assert stats["plot-ppo"]["traces"] >= 8  # reward, KL, KL coef, length, entropy, samples/s, losses, times
    assert page.evaluate("window.__pwned") is None  # a sample's <script> stayed text
    assert not errors, errors
    assert page.locator("section.not-run").count() == 0
    context.close()


def test_a_partial_run_report_shows_not_run_in_chromium(browser, tmp_path, artifacts_dir):  # noqa: F811
    run = make_report_run(tmp_path, stages=("data", "pretrain"))
    context, page, errors = open_report(browser, run, artifacts_dir, "report-partial-run")
    not_run = page.locator("section.not-run")
    assert not_run.count() == 5  # sft, reward, ppo, eval, samples
    assert "not run (no eval/results.json" in page.locator("section#eval").inner_text()
    assert page.locator(".js-plotly-plot").count() == 4  # funnel, drops, pretrain, timings
    assert not errors, errors
    context.close()
