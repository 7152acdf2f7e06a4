"""Run directories on object storage, against a real S3-protocol server on loopback (moto): the storage layer,
the refusals, and ``raylm data`` -> ``raylm pretrain`` with the run dir and the corpus in the bucket."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from cluster.cli import main as raylm
from cluster.config import atomic_write_json
from cluster.rundir import MetricsLog, RunDir, read_metrics
from cluster.storage import ObjectPath, location, remove_tree
from pipelines.data.planted import planted_corpus


@pytest.fixture()
def bucket(s3_server) -> str:
    import boto3

    name = f"raylm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def keys(bucket: str, prefix: str = "") -> set[str]:
    """What is in the bucket, as listed by boto3 (a second client: not the code under test)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    # keys ending in "/" are the empty directory markers pyarrow leaves: not content
    return {obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")}


def test_object_paths_read_write_list_and_remove(bucket):
    root = RunDir.create(f"s3://{bucket}/runs/x", ["data", "pretrain"]).root
    assert root == location(f"s3://{bucket}/runs/x") and not root.exists()
    atomic_write_json(root / "data" / "stats.json", {"docs": 3})
    (root / "data" / "shards" / "train-00000.parquet").write_bytes(b"PAR1")
    assert json.loads((root / "data" / "stats.json").read_text()) == {"docs": 3}
    assert root.is_dir() and (root / "data" / "stats.json").is_file()
    assert sorted(p.name for p in root.glob("data/*")) == ["shards", "stats.json"]
    assert [p.name for p in root.glob("data/shards/*.parquet")] == ["train-00000.parquet"]
    remove_tree(root / "data" / "shards")
    assert keys(bucket) == {"runs/x/data/stats.json"}
    assert location(str(Path("s3://b/x"))) == ObjectPath("s3://b/x")  # what pathlib makes of a URI


def test_a_missing_bucket_is_refused_before_any_work(s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert raylm(["data", "--run-dir", "s3://no-such-bucket/runs/x"]) == 2
    assert "--run-dir s3://no-such-bucket/runs/x: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_metrics_log_on_object_storage_is_uploaded_whole(bucket):
    stage = location(f"s3://{bucket}/runs/x/pretrain")
    log = MetricsLog(stage, upload_every_s=3600)
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5})
    assert [r["step"] for r in read_metrics(stage)] == [1]  # the first line goes at once, then every hour
    log.close()
    assert [r["step"] for r in read_metrics(stage)] == [1, 2]
    resumed = MetricsLog(stage)  # a resumed run continues the same log
    resumed.log({"step": 3, "loss": 1.0})
    resumed.close()
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3]


def test_tokenizer_shards_and_export_round_trip_through_the_bucket(bucket, tmp_path):
    """The pieces of data -> pretrain that touch storage, without Ray: the workers' shard writer and the
    driver's renames and manifest, the trainer's reader, the tokenizer, and the HF export."""
    import numpy as np
    import pyarrow as pa
    import torch

    from cluster.schemas.model import ModelConfig
    from pipelines.data.shards import finalize_shards, write_manifest, write_shard_block
    from pipelines.hf_export import export_hf, load_hf_model
    from pipelines.model import build_model
    from pipelines.pretrain.shards import ShardBatches, read_manifest
    from pipelines.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

    data = location(f"s3://{bucket}/runs/x/data")
    texts = [" ".join(["ray", "data", "train", "serve"][i % 4] * (i % 7 + 1) for i in range(40))] * 50
    train_tokenizer(iter(texts), data / "tokenizer", vocab_size=300)
    tok = load_tokenizer(data / "tokenizer")
    rows = np.arange(12 * 16, dtype=np.int32).reshape(12, 16) % 300
    packed = pa.table({"split": ["train"] * 8 + ["validation"] * 4,
                       "input_ids": pa.array(list(rows), type=pa.list_(pa.int32())),
                       "doc_starts": pa.array([[0]] * 12, type=pa.list_(pa.int32())),
                       "dropped_tokens": pa.array([0] * 12, type=pa.int64())})
    summaries = write_shard_block(packed, str(data / "shards"), 300, "00000").to_pylist()
    totals = finalize_shards(summaries, data / "shards", 300)
    write_manifest(data / "shards", seq_len=16, vocab_size=300, tokenizer_dir=data / "tokenizer",
                   tokenizer_hash=tokenizer_hash(data / "tokenizer"), eos_id=tok.eos_token_id, totals=totals)
    assert keys(bucket, "runs/x/data/shards/") == {f"runs/x/data/shards/{n}" for n in
                                                   ("manifest.json", "train-00000.parquet", "validation-00000.parquet")}
    assert read_manifest(str(data / "shards"))["tokenizer_dir"] == str(data / "tokenizer")
    inputs, labels = next(iter(ShardBatches(str(data / "shards"), 4, seed=0)("train", 0, 1, epoch=0)))
    assert inputs.shape == (4, 15) and torch.equal(inputs[:, 1:], labels[:, :-1])

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model = build_model(cfg, 300, seed=0)
    out = data.parent / "pretrain" / "model"
    assert export_hf(model.state_dict(), cfg, 300, data / "tokenizer", out) == out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    from cluster.storage import local_copy

    with local_copy(out) as local:
        loaded, _, _ = load_hf_model(local)
    assert torch.equal(loaded.embed.weight, model.embed.weight)


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "eval", "serve"])
def test_stages_without_object_store_support_refuse_a_uri_run_dir(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert raylm([stage, "--run-dir", "s3://bucket/runs/x"]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir s3://bucket/runs/x: `raylm {stage}` does not support run directories on object" in err
    assert list(tmp_path.iterdir()) == []  # no local folder named "s3:"


def test_run_refuses_a_uri_run_dir_before_its_first_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert raylm(["run", "--stages", "data,pretrain,sft", "--run-dir", "gs://b/r"]) == 2
    assert "`raylm sft` does not support run directories on object storage" in capsys.readouterr().err
    assert raylm(["submit", "--dry-run", "--", "eval", "--run-dir=gs://b/r"]) == 2
    assert "`raylm eval` does not support" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def s3_cluster(s3_server, ray_cluster):
    """The session cluster with the S3 settings in its workers' environment: a cluster started by an earlier
    test, before the S3 server existed, is started again (its runtime env was fixed at ``ray.init``)."""
    import ray

    from cluster.recipe import RayConfig
    from cluster.runtime import init_ray

    if ray.get_runtime_context().runtime_env.env_vars().get("AWS_ENDPOINT_URL") != s3_server:
        ray.shutdown()
        init_ray(RayConfig(num_cpus=4))
    return ray


TINY = ["data.quality.languages=[]", "data.num_blocks=2", "data.tokenize.seq_len=64", "data.tokenize.batch_docs=64",
        "data.tokenize.val_fraction=0.2", "tokenizer.vocab_size=400", "tokenizer.train_docs=100",
        "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
        "model.max_seq_len=64", "pretrain.num_workers=2", "pretrain.max_steps=4", "pretrain.warmup_steps=1",
        "pretrain.eval_every=2", "pretrain.checkpoint_every=2", "pretrain.micro_batch_size=4",
        "pretrain.eval_batches=1"]


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_data_then_pretrain_with_the_run_dir_and_corpus_on_s3(s3_cluster, bucket, tmp_path, monkeypatch, capsys):
    import boto3
    from transformers import AutoModelForCausalLM

    from cluster.storage import local_copy

    for path in planted_corpus(n_base=30).write_jsonl(tmp_path / "corpus", files=2):
        boto3.client("s3").upload_file(str(path), bucket, f"corpus/{path.name}")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run = f"s3://{bucket}/runs/x"
    assert raylm(["data", "--run-dir", run, "--input", f"s3://{bucket}/corpus", *TINY]) == 0
    assert raylm(["pretrain", "--run-dir", run, *TINY]) == 0
    found = keys(bucket, "runs/x/")
    for key in ["config.yaml", "data/shards/manifest.json", "data/shards/train-00000.parquet",
                "data/shards/validation-00000.parquet", "data/tokenizer/tokenizer.json", "data/stats.json",
                "data/lineage.json", "pretrain/model/config.json", "pretrain/model/model.safetensors",
                "pretrain/model/tokenizer.json", "pretrain/metrics.jsonl", "pretrain/summary.json",
                "pretrain/workers.json", "pretrain/lineage.json"]:
        assert f"runs/x/{key}" in found, (key, sorted(found))
    assert any(k.startswith("runs/x/data/documents/") for k in found)
    assert any(k.startswith("runs/x/pretrain/checkpoint_") and k.endswith("worker_state_rank1.pt") for k in found)
    assert not any("/.tmp-" in k for k in found), sorted(k for k in found if "/.tmp-" in k)
    manifest = json.loads((location(run) / "data" / "shards" / "manifest.json").read_text())
    assert manifest["tokenizer_dir"] == f"{run}/data/tokenizer"
    assert [r["step"] for r in read_metrics(location(run) / "pretrain") if "step" in r] == [1, 2, 3, 4]
    assert RunDir(location(run)).latest_model() == location(run) / "pretrain" / "model"
    with local_copy(location(run) / "pretrain" / "model") as model_dir:
        assert AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 2
    from pipelines.pretrain.export import main as export_main

    assert export_main([run, "--out", str(tmp_path / "exported")]) == 0  # the offline export reads the bucket
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    capsys.readouterr()
    assert raylm(["lineage", f"{run}/pretrain/model"]) == 0  # back to the corpus objects, nothing changed
    assert f"s3://{bucket}/corpus/part-0.jsonl" in capsys.readouterr().out
    assert list(work.iterdir()) == []  # nothing written here: no local folder named "s3:"
