"""The console of a run: one progress display per stage, fed by its metrics.jsonl; Ray's logs to the run dir."""
import io
import json
import logging

import pytest

from cluster.progress import MetricsTail, PipelineProgress, StageProgress, route_ray_logs, step_total
from cluster.recipe import load_recipe
from cluster.rundir import RunDir
from tests.polling import wait_for


def _append(path, *records, partial: str = ""):
    with path.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
        fh.write(partial)


def test_tail_reads_only_new_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"step": 7})  # a resumed stage appends after its earlier records
    tail = MetricsTail(path)
    _append(path, {"step": 8}, partial='{"step": 9')
    assert tail.read() == [{"step": 8}]
    _append(path, partial='}\n')
    assert tail.read() == [{"step": 9}]


def test_status_line_has_step_rate_eta_and_loss(tmp_path):
    path = tmp_path / "metrics.jsonl"
    display = StageProgress("[2/3] pretrain", path, total=20, terminal=False)
    assert display.status().startswith("[2/3] pretrain: running, 0/20 steps, ")
    _append(path, {"step": 1, "loss": 9.0, "time": 100.0})
    display.poll()
    # several steps in one read: the rate comes from the records' own times; records without a step are skipped
    _append(path, {"step": 3, "time": 104.0}, {"step": 5, "loss": 6.25, "lr": 1e-3, "time": 108.0}, {"time": 1.0})
    display.poll()
    line = display.status()
    assert line.startswith("[2/3] pretrain: step 5/20 (25%), 0.50 step/s, ETA 30s, loss 6.25, ")
    assert "lr" not in line


def test_periodic_line_outside_a_terminal(tmp_path):
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    with StageProgress("[1/1] ppo", path, total=3, stream=out, terminal=False, interval=0.05):
        _append(path, {"step": 2, "reward_mean": 0.5})
        wait_for(lambda: "step 2/3" in out.getvalue(), 30, "a status line with the new step")
    assert all(line.startswith("[1/1] ppo: ") for line in out.getvalue().splitlines())


def test_pipeline_outline_and_failure(tmp_path):
    recipe = load_recipe(None, ["pretrain.max_steps=40", "pretrain.stop_at_step=10", "ppo.iterations=4"])
    assert (step_total(recipe.pretrain), step_total(recipe.ppo), step_total(recipe.data)) == (10, 4, None)
    out = io.StringIO()
    with pytest.raises(RuntimeError), PipelineProgress(["data", "serve"], stream=out, recipe=recipe,
                                                        run_dir=RunDir.create(tmp_path / "run")) as progress:
        progress.start("data")
        progress.done("data", 1.5, {"docs_kept": 3})
        progress.start("serve")  # runs until stopped: no display
        raise RuntimeError("boom")
    assert out.getvalue().splitlines() == [
        "raylm: 2 stage(s): data -> serve", "[1/2] data: started", "[1/2] data: done in 1.5s (docs_kept=3)",
        "[2/2] serve: started", out.getvalue().splitlines()[-1]]
    assert out.getvalue().splitlines()[-1].startswith("raylm: failed after ")


@pytest.fixture
def ray_console(monkeypatch):
    """What Ray's console handlers print, as a StringIO; restores them and Ray Data's progress switch after."""
    import ray.data

    monkeypatch.delenv("RAYLM_RAY_LOGS", raising=False)
    console = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data")]
    saved = [(lg, list(lg.handlers), [h.level for h in lg.handlers]) for lg in loggers]
    logger_levels = [lg.level for lg in loggers]  # restored after: the CLI lowers "ray" to INFO
    for handler in [h for lg in loggers for h in lg.handlers]:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            monkeypatch.setattr(handler, "stream", console)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    yield console
    context.enable_progress_bars = bars
    for logger, level in zip(loggers, logger_levels, strict=True):
        logger.setLevel(level)
    for logger, handlers, levels in saved:
        for handler in logger.handlers[len(handlers):]:
            logger.removeHandler(handler)
            handler.close()
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


def test_ray_logs_go_to_the_run_dir_errors_stay_on_the_console(tmp_path, ray_console):
    import ray.data

    path = route_ray_logs(tmp_path / "logs")
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset x")
    logging.getLogger("ray.train").warning("worker group restarted")
    logging.getLogger("ray.data").error("a task failed")
    err = ray_console.getvalue()
    assert "Execution plan" not in err and "worker group" not in err and "a task failed" in err
    text = path.read_text()
    assert "Execution plan of Dataset x" in text and "worker group restarted" in text


def test_ray_logs_flag_keeps_them_on_the_console(tmp_path, ray_console, monkeypatch):
    monkeypatch.setenv("RAYLM_RAY_LOGS", "1")
    assert route_ray_logs(tmp_path / "logs") is None
    assert not (tmp_path / "logs").exists()


@pytest.mark.ray
def test_a_failing_stage_still_prints_its_error_and_little_else(ray_cluster, ray_console, tmp_path, capsys):
    """Through the CLI on the session cluster: the error of a Ray task (an unreadable input) reaches the console
    in one line naming the file; Ray's own records went to the run dir."""
    import gzip

    from cluster.cli import main

    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "fine line"}\n')[:-12])  # truncated gzip stream
    run_dir = tmp_path / "run"
    assert main(["data", "--run-dir", str(run_dir), "--input", str(bad), "data.num_blocks=1"]) == 1
    err = capsys.readouterr().err
    assert f"raylm: error: {bad}: " in err
    assert len(err.splitlines()) < 12, err  # the outline, the error; no Ray Data progress
    assert (run_dir / "logs" / "ray-driver.log").is_file()
