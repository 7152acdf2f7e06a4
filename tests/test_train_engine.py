"""Real Ray Train + DeepSpeed runs of ``raylm pretrain`` on the session cluster (2 workers, gloo, fp32 CPU).

Each fit costs ~30-50 s, so runs are shared between assertions: one ZeRO-2 reference run, its stopped-and-
resumed twin, a run whose worker is killed, ZeRO-2 and ZeRO-3 runs with CPU offload, a ZeRO-3 run and a
2-stage pipeline run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from test_pretrain_shards import write_shards

from cluster.recipe import load_recipe, save_resolved
from cluster.rundir import RunDir, read_metrics
from cluster.stage import StageContext

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
        "model.max_seq_len=64", "data.tokenize.seq_len=64", "pretrain.num_workers=2", "pretrain.max_steps=6",
        "pretrain.warmup_steps=2", "pretrain.eval_every=3", "pretrain.checkpoint_every=3",
        "pretrain.micro_batch_size=4", "pretrain.eval_batches=2", "pretrain.lr=0.003", "pretrain.min_lr=0.0003"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class GatedBatches:
    """Wraps ``TrainTask.batches``: a worker process's ``gate_after``-th train micro-batch waits until the
    ``gate`` file exists, so the test can kill a worker at a known step. Not a stand-in: the data is real."""

    def __init__(self, inner, gate: str, gate_after: int):
        self.inner, self.gate, self.gate_after, self.served = inner, gate, gate_after, 0

    def __call__(self, split, rank, world_size, epoch):
        for batch in self.inner(split, rank, world_size, epoch):
            if split == "train":
                self.served += 1
                if self.served == self.gate_after:
                    wait_for(lambda: os.path.exists(self.gate), 300, "the test's gate file")
            yield batch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    write_shards(root)
    return root / "data"


def new_run(tmp_path: Path, data_dir: Path, name: str) -> RunDir:
    run = RunDir.create(tmp_path / name)
    shutil.copytree(data_dir, run.root / "data")
    return run


def pretrain(run: RunDir, *overrides: str) -> dict:
    from pipelines.pretrain.stage import run as run_stage

    recipe = load_recipe(None, TINY + list(overrides))
    save_resolved(recipe, run.root)  # as the CLI does; the offline exporter reads it
    return run_stage(StageContext(recipe=recipe, run_dir=run))


def exported(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.model_dir("pretrain") / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def registered_steps(stage_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its own snapshot file)."""
    try:
        snapshot = json.loads((stage_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [c["metrics"].get("step") for c in snapshot.get("checkpoint_results", [])]


def checkpoints(run: RunDir) -> list[Path]:
    return sorted(p for p in run.stage("pretrain").glob("checkpoint_*") if p.is_dir())


def last_checkpoint(run: RunDir) -> Path:
    return checkpoints(run)[-1]


def offline_export(run: RunDir, tmp_path: Path) -> dict[str, torch.Tensor]:
    from pipelines.pretrain.export import main

    assert main([str(run.root), "--out", str(tmp_path / "offline")]) == 0
    return load_file(str(tmp_path / "offline" / "model.safetensors"))


def assert_hf_parity(model_dir: Path, reference_state: dict | None = None) -> None:
    """The export loads in transformers and gives our model's logits (from ``reference_state`` if given)."""
    from transformers import AutoModelForCausalLM

    from pipelines.hf_export import load_hf_model

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ours, _, vocab = load_hf_model(model_dir)
    if reference_state is not None:
        ours.load_state_dict(reference_state)
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory, data_dir):
    """ZeRO-2, 6 steps straight through, with the recipe's optimizer (Muon for the blocks, AdamW for the rest)."""
    run = new_run(tmp_path_factory.mktemp("ref"), data_dir, "run")
    summary = pretrain(run, "pretrain.zero_stage=2")
    return run, summary


@pytest.fixture(scope="module")
def adamw_reference_run(ray_cluster, tmp_path_factory, data_dir):
    """The same with AdamW for every parameter: what the offload modes run (Muon refuses optimizer offload)."""
    run = new_run(tmp_path_factory.mktemp("ref-adamw"), data_dir, "run")
    pretrain(run, "pretrain.zero_stage=2", "pretrain.optimizer=adamw")
    return run


def test_zero2_run_reports_metrics_checkpoints_and_exports(reference_run):
    run, summary = reference_run
    records = read_metrics(run.stage("pretrain"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in records), key
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert records[0]["lr"] == pytest.approx(0.0015)  # warmup: step 1 of 2, AdamW's rate
    assert records[0]["muon_lr"] == pytest.approx(0.005)  # tiny-cpu's Muon rate 0.01, the same warm-up
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["steps"] == 6 and summary["val_loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-4)
    assert len(checkpoints(run)) == 2  # keep_checkpoints
    assert (run.stage("pretrain") / "tensorboard").is_dir()
    assert_hf_parity(run.model_dir("pretrain"))


def test_stopped_and_resumed_run_ends_bitwise_equal(reference_run, tmp_path, data_dir):
    ref, _ = reference_run
    run = new_run(tmp_path, data_dir, "split")
    first = pretrain(run, "pretrain.zero_stage=2", "pretrain.stop_at_step=3")
    assert first["steps"] == 3 and not run.model_dir("pretrain").exists()  # stopped: no export
    pretrain(run, "pretrain.zero_stage=2")  # the same command again continues from step 3
    steps = [r["step"] for r in read_metrics(run.stage("pretrain"))]
    assert steps == [1, 2, 3, 4, 5, 6]
    ref_losses = [r["loss"] for r in read_metrics(ref.stage("pretrain"))]
    assert [r["loss"] for r in read_metrics(run.stage("pretrain"))] == ref_losses
    assert_same_weights(exported(run), exported(ref))


def test_killed_worker_is_restarted_from_the_last_checkpoint(reference_run, tmp_path, data_dir):
    from pipelines.pretrain.shards import read_manifest
    from pipelines.pretrain.task import pretrain_task
    from pipelines.train.engine import fit

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # GatedBatches travels by value
    ref, _ = reference_run
    run = new_run(tmp_path, data_dir, "killed")
    recipe = load_recipe(None, TINY + ["pretrain.zero_stage=2"])
    shards = run.root / "data" / "shards"
    task = pretrain_task(recipe.model, recipe.pretrain, read_manifest(shards), shards, recipe.seed)
    gate = tmp_path / "gate"
    task.batches = GatedBatches(task.batches, str(gate), gate_after=5)  # step 5's micro-batch
    stage_dir = run.stage("pretrain")
    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = fit(task, recipe.pretrain, stage_dir, seed=recipe.seed,
                                     export_dir=run.model_dir("pretrain"))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        # Ray's controller registers a reported checkpoint when it next polls (every 2 s): wait for that too.
        wait_for(lambda: 3 in registered_steps(stage_dir), 240, "the step-3 checkpoint to be registered")
        wait_for(lambda: any(r["step"] == 4 for r in read_metrics(stage_dir)), 60, "step 4")
        workers = json.loads((stage_dir / "workers.json").read_text())
        assert [w["rank"] for w in workers] == [0, 1]
        os.kill(workers[1]["pid"], signal.SIGKILL)
    finally:
        gate.touch()
    thread.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    steps = [r["step"] for r in read_metrics(stage_dir)]
    assert steps.count(1) == 1 and steps.count(4) == 2, steps  # steps 4.. re-run from the step-3 checkpoint
    assert outcome["summary"]["steps"] == 6
    assert_same_weights(exported(run), exported(ref))


@pytest.mark.parametrize("offload", [
    ("pretrain.zero_stage=2", "pretrain.offload_optimizer=true", "pretrain.optimizer=adamw"),
    ("pretrain.zero_stage=3", "pretrain.offload_optimizer=true", "pretrain.offload_params=true", "pretrain.optimizer=adamw"),
], ids=["zero2-offload-optimizer", "zero3-offload-params-and-optimizer"])
def test_offloaded_runs_train_like_the_reference_and_export(adamw_reference_run, tmp_path, data_dir, offload):
    # torch AdamW steps the CPU copies (zero_force_ds_cpu_optimizer: false): no cpu_adam compile. Offload moves
    # state, not math, so the losses follow the ZeRO-2 AdamW run's to float rounding.
    ref = adamw_reference_run
    run = new_run(tmp_path, data_dir, "offload")
    summary = pretrain(run, *offload)
    assert summary["steps"] == 6
    losses = [r["loss"] for r in read_metrics(run.stage("pretrain"))]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(ref.stage("pretrain"))], rel=1e-5)
    assert_hf_parity(run.model_dir("pretrain"))


def test_zero3_export_is_the_consolidated_checkpoint(ray_cluster, tmp_path, data_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipelines.hf_export import from_hf_state_dict

    run = new_run(tmp_path, data_dir, "zero3")
    summary = pretrain(run, "pretrain.zero_stage=3", "pretrain.activation_checkpointing=true")
    assert summary["steps"] == 6 and summary["val_loss"] < summary["unigram_entropy_nats"] + 3
    # DeepSpeed's own offline consolidation of the ZeRO-3 partitions must agree with our export.
    ds_state = get_fp32_state_dict_from_zero_checkpoint(str(last_checkpoint(run)), tag="deepspeed")
    ours = from_hf_state_dict(exported(run))
    for key, value in ours.items():
        torch.testing.assert_close(ds_state[key], value, rtol=0, atol=0)
    assert_hf_parity(run.model_dir("pretrain"), ds_state)
    assert_same_weights(offline_export(run, tmp_path), exported(run))


def test_two_stage_pipeline_trains_and_exports(ray_cluster, tmp_path, data_dir):
    run = new_run(tmp_path, data_dir, "pipe")
    summary = pretrain(run, "pretrain.pipeline_stages=2", "pretrain.zero_stage=1", "model.tie_embeddings=false",
                       "pretrain.grad_accum=2", "pretrain.activation_checkpointing=true")
    records = read_metrics(run.stage("pretrain"))
    assert summary["steps"] == 6 and records[-1]["loss"] < records[0]["loss"]
    # The per-layer files DeepSpeed wrote, consolidated offline, must be what the run exported.
    layer_files = sorted((last_checkpoint(run) / "deepspeed").glob("layer_*-model_states.pt"))
    assert len(layer_files) == 4  # embedding, 2 blocks, head
    assert_same_weights(offline_export(run, tmp_path), exported(run))
    assert_hf_parity(run.model_dir("pretrain"))
