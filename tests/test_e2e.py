"""The whole pipeline in one command: data -> pretrain -> sft -> reward -> ppo -> eval -> report -> serve, then
one chat request."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cluster.cli import main as raylm
from cluster.rundir import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.serve]

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "smoke-cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_raylm_run_whole_pipeline_then_chat(ray_cluster, tmp_path, capsys):
    from openai import OpenAI
    from ray import serve

    port = free_port()
    run_dir = tmp_path / "run"
    try:
        rc = raylm(["run", "-c", str(RECIPE), "--run-dir", str(run_dir), "--no-block", f"serve.port={port}"])
        assert rc == 0
        captured = capsys.readouterr()
        for i, stage in enumerate(["data", "pretrain", "sft", "reward", "ppo", "eval", "report", "serve"], start=1):
            assert f"[{i}/8] {stage}: done in" in captured.err
        report = run_dir / "report" / "report.html"
        assert f"raylm report: {report}" in captured.out and str(run_dir / "eval" / "results.json") in captured.out
        assert "not run" not in (run_dir / "report" / "report.md").read_text()
        assert (run_dir / "config.yaml").is_file()
        assert (run_dir / "data" / "shards" / "manifest.json").is_file()
        for stage in ("pretrain", "sft", "reward", "ppo"):
            assert (run_dir / stage / "model" / "config.json").is_file(), stage
            assert read_metrics(run_dir / stage), f"{stage} wrote no metrics"
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        assert [m["name"] for m in results["models"]] == ["pretrain", "sft", "ppo"]
        assert all(0 < m["bpb"]["bits_per_byte"] < 16 for m in results["models"])
        assert all("raylm_qa_mc" in m["lm_eval"]["tasks"] for m in results["models"])
        assert results["reward_model"]["pairs"] > 0
        assert 0 <= results["policy"]["models"]["ppo"]["win_rate_vs_sft"] <= 1  # judged by the run's reward model
        assert raylm(["lineage", str(run_dir / "ppo" / "model")]) == 0  # back to the corpus, nothing changed
        assert "data: OK" in capsys.readouterr().out
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        models = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model=models[0], messages=[{"role": "user", "content": "What does `json.dumps` do?"}],
            max_tokens=8, temperature=0)
        assert reply.choices[0].message.content is not None
        assert reply.usage.completion_tokens > 0
    finally:
        serve.shutdown()


def test_raylm_run_with_dpo_alignment_then_chat(ray_cluster, tmp_path, capsys):
    """`alignment: dpo`: the default stage list puts dpo in place of reward + ppo, and eval, report and serve pick
    up the DPO model."""
    from openai import OpenAI
    from ray import serve

    port = free_port()
    run_dir = tmp_path / "run"
    try:
        rc = raylm(["run", "-c", str(RECIPE), "--run-dir", str(run_dir), "--no-block", "alignment=dpo",
                    f"serve.port={port}", "pretrain.max_steps=6", "pretrain.checkpoint_every=6", "sft.max_steps=4",
                    "sft.checkpoint_every=4", "dpo.max_steps=4", "dpo.checkpoint_every=4", "eval.tasks=[]"])
        assert rc == 0
        err = capsys.readouterr().err
        for i, stage in enumerate(["data", "pretrain", "sft", "dpo", "eval", "report", "serve"], start=1):
            assert f"[{i}/7] {stage}: done in" in err
        assert not (run_dir / "reward").exists() and not (run_dir / "ppo").exists()
        heldout = json.loads((run_dir / "dpo" / "heldout.json").read_text())
        assert 0 <= heldout["val_accuracy"] <= 1 and heldout["val_pairs"] > 0
        assert [m["name"] for m in json.loads((run_dir / "eval" / "results.json").read_text())["models"]] == [
            "pretrain", "sft", "dpo"]
        md = (run_dir / "report" / "report.md").read_text()
        assert "Training: dpo" in md and "Training: ppo" not in md and "| dpo | OK |" in md
        assert 'id="plot-dpo"' in (run_dir / "report" / "report.html").read_text()
        assert raylm(["lineage", str(run_dir / "dpo" / "model")]) == 0  # dpo -> sft -> pretrain -> data
        assert "data: OK" in capsys.readouterr().out
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        card = client.models.retrieve(client.models.list().data[0].id).model_dump()
        assert card["lineage"][0]["stage"] == "dpo"  # the served model is the DPO model
        reply = client.chat.completions.create(
            model=card["id"], messages=[{"role": "user", "content": "What does `json.dumps` do?"}],
            max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens > 0
    finally:
        serve.shutdown()
