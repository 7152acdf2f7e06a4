"""The benchmarks are scripts nobody imports, so a renamed keyword in the code they drive breaks them silently
(``pretrain_quality.py`` once called ``fit(ray_cfg=)`` for a whole session). A few steps in a fresh interpreter, as
a user runs them, catch it for what they drive: here ``--local`` (engine builder, train step, export, scoring, the
baseline's own process), not the Ray path, which would cost a cluster start of its own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.deepspeed
def test_pretrain_quality_local_runs_and_prints_its_ratio(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}.\n"
                            for i in range(1500)))
    done = subprocess.run(
        [sys.executable, "benchmarks/pretrain_quality.py", "--local", "--text", str(text), "--work-dir",
         str(tmp_path / "work"), "--max-val-bytes", "4096", "pretrain.max_steps=3", "pretrain.warmup_steps=1",
         "tokenizer.vocab_size=512"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{\n"):done.stdout.rindex("}") + 1])
    assert report["raylm"]["steps"] == 3 and report["baseline"]["iterations"] > 0
    assert 0 < report["raylm"]["bits_per_byte"] < 16 and report["ratio"] > 0
    assert "ratio raylm / baseline bits per byte" in done.stdout
