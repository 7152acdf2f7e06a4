"""raylm report on a tiny run directory: both files written, the markdown twin says what the page says, a run
that stopped early shows 'not run' (never a crash), text from the run is escaped, a rerun is byte-identical."""
from __future__ import annotations

import pytest
from report_fixtures import HOSTILE, make_report_run

from cluster.cli import main as raylm
from pipelines.report.stage import build_report

pytest.importorskip("plotly", reason="plotly is a dependency: `make install` adds it")


def test_full_run_report_has_every_part_and_reproduces(tmp_path):
    run = make_report_run(tmp_path)
    paths = build_report(run)
    assert paths["not_run"] == [] and paths["eval_results"] == str(run / "eval" / "results.json")
    md = (run / "report" / "report.md").read_text()
    html_first = (run / "report" / "report.html").read_bytes()
    for line in ["| quality | min_words | 3 | 40 |",  # dropped, by rule and why
                 "| near_dedup | 13 | 12 | 1 | 3,000 |",  # the funnel
                 "| exact_dedup | a/copy.txt | a/orig.txt | the kept original text |",  # an example pair
                 "| bytes per token (corpus after dedup) | 3 |",  # 3000 bytes / (880 + 116 + 4) tokens
                 "| pretrain | 2.5000 | - |", "| sft | 2.7000 | +0.2000 |",  # stage-by-stage eval
                 "| reward model | accuracy 0.6, margin 0.4 on 10 held-out pairs (builtin) |"]:
        assert line in md, line
    assert "not run" not in md
    for stage in ("data", "pretrain", "sft", "reward", "ppo", "eval"):
        assert f"| {stage} | OK |" in md  # lineage, re-checked against the disk
    html = html_first.decode()
    for plot in ("funnel", "drops", "pretrain", "sft", "reward", "ppo", "timings", "eval"):
        assert f'id="plot-{plot}"' in html, plot
    assert "<script src=" not in html  # self-contained: plotly's JS is inlined, nothing loads from elsewhere
    build_report(run)
    assert (run / "report" / "report.html").read_bytes() == html_first


def test_run_text_is_escaped_in_html_and_kept_in_one_markdown_cell(tmp_path):
    run = make_report_run(tmp_path)
    build_report(run)
    html = (run / "report" / "report.html").read_text()
    assert "<script>window.__pwned" not in html and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    md = (run / "report" / "report.md").read_text()
    cell = HOSTILE.replace("|", "\\|").replace("\n", "<br>")
    assert f"| ppo (chat) | {cell} |" in md


def test_a_dpo_run_shows_dpo_in_place_of_reward_and_ppo(tmp_path):
    run = make_report_run(tmp_path, stages=("data", "pretrain", "sft", "dpo", "eval"))
    paths = build_report(run)
    assert paths["not_run"] == []  # reward and ppo are the path this run did not take, not missing parts
    md = (run / "report" / "report.md").read_text()
    assert "Training: dpo" in md and "Training: reward" not in md and "Training: ppo" not in md
    assert "| dpo | OK |" in md  # lineage: dpo -> sft -> pretrain -> data
    assert 'id="plot-dpo"' in (run / "report" / "report.html").read_text()


def test_a_run_that_stopped_after_pretrain_says_not_run(tmp_path):
    run = make_report_run(tmp_path, stages=("data", "pretrain"))
    paths = build_report(run)
    assert paths["not_run"] == ["train-sft", "train-reward", "train-ppo", "eval", "samples"]
    assert paths["eval_results"] is None
    md = (run / "report" / "report.md").read_text()
    assert "_not run (no sft/metrics.jsonl)_" in md and "_not run (no eval/results.json" in md
    assert "| pretrain | OK |" in md and 'id="plot-pretrain"' in (run / "report" / "report.html").read_text()


def test_an_empty_run_dir_renders_every_part_as_not_run(tmp_path):
    (tmp_path / "run").mkdir()
    paths = build_report(tmp_path / "run")
    assert len(paths["not_run"]) == 9  # data, 4 training stages, timings, eval, samples, lineage
    assert (tmp_path / "run" / "report" / "report.html").stat().st_size > 0


def test_cli_prints_the_paths_and_names_a_missing_run_dir(tmp_path, capsys):
    run = make_report_run(tmp_path, stages=("data",))
    assert raylm(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"raylm report: {run / 'report' / 'report.html'}" in out and "eval results: not run" in out
    assert raylm(["report", "--run-dir", str(run)]) == 0
    assert raylm(["report", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}: run directory not found" in capsys.readouterr().err


def test_report_is_a_step_of_raylm_run_and_prints_both_paths(tmp_path, capsys):
    from cluster.cli import run_stages
    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir
    from cluster.stage import StageContext

    run = make_report_run(tmp_path)
    ctx = StageContext(recipe=load_recipe(None, []), run_dir=RunDir.create(run))
    [result] = run_stages(ctx, ["report"])  # the step `raylm run` takes after eval (no Ray needed)
    assert result["report"] == str(run / "report" / "report.html")
    out, err = capsys.readouterr()
    assert f"raylm report: {run / 'report' / 'report.html'}" in out
    assert f"eval results: {run / 'eval' / 'results.json'}" in out and "[1/1] report: done in" in err
    assert (run / "report" / "timing.json").is_file()
