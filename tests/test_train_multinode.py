"""``raylm pretrain`` across two (simulated) nodes: ``ray.cluster_utils.Cluster`` with one 1-CPU worker node
per training worker and STRICT_SPREAD placement. Runs in a subprocess so the session's Ray cluster stays intact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_engine import assert_hf_parity

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

SCRIPT = r"""
import json, sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cluster.recipe import load_recipe
from cluster.rundir import RunDir
from cluster.runtime import project_runtime_env
from cluster.stage import StageContext
from pipelines.pretrain.stage import run
from test_pretrain_shards import write_shards
from test_train_engine import TINY

root = Path(sys.argv[1])
write_shards(root)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=project_runtime_env())
    recipe = load_recipe(None, TINY + ["pretrain.zero_stage=1", "pretrain.placement_strategy=STRICT_SPREAD"])
    summary = run(StageContext(recipe=recipe, run_dir=RunDir.create(root)))
    workers = json.loads((root / "pretrain" / "workers.json").read_text())
    nodes = sorted({w["node_id"] for w in workers})
    worker_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))
    print("RESULT " + json.dumps({"summary": summary, "nodes": nodes, "worker_nodes": worker_nodes}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_pretrain_spreads_one_worker_per_node(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["summary"]["steps"] == 6
    assert len(result["worker_nodes"]) == 2
    assert result["nodes"] == result["worker_nodes"]  # one training worker on each node
    assert_hf_parity(tmp_path / "run" / "pretrain" / "model")
