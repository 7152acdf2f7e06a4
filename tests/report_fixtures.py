"""A tiny run directory for the report tests, written in seconds: the files each stage leaves (stats.json, the
dropped/documents parquet, metrics.jsonl through the stages' own MetricsLog, eval/results.json, lineage records
through pipelines.lineage.record_stage, as tests/test_lineage.py does), with small made-up numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import atomic_write_json
from cluster.recipe import load_recipe
from cluster.rundir import MetricsLog
from pipelines.lineage import record_stage

ALL_STAGES = ("data", "pretrain", "sft", "reward", "ppo", "eval")
# text from a run lands in the page: this sample checks it is escaped (HTML) and kept in one cell (markdown)
HOSTILE = "<script>window.__pwned = 1</script> a | b\nnext line"


def _stats() -> dict:
    drop = {"min_words": {"docs": 3, "bytes": 40}, "language": {"docs": 1, "bytes": 90}}
    return {"input": {"files": 1}, "skipped_files": [], "throughput": {"read+clean": {"docs": 20, "seconds": 1.5}},
            "stages": {
                "input": {"docs_in": 20, "docs_out": 20, "bytes_in": 4000, "bytes_out": 4000, "dropped": {}},
                "normalize": {"docs_in": 20, "docs_out": 19, "bytes_in": 4000, "bytes_out": 4000,
                              "dropped": {"empty": {"docs": 1, "bytes": 0}}},
                "quality": {"docs_in": 19, "docs_out": 15, "bytes_in": 4000, "bytes_out": 3870, "dropped": drop},
                "pii": {"docs_in": 15, "docs_out": 15, "bytes_in": 3870, "bytes_out": 3800, "dropped": {}},
                "exact_dedup": {"docs_in": 15, "docs_out": 13, "bytes_in": 3800, "bytes_out": 3300, "duplicates": 2,
                                "cluster_sizes": {"2": 2}},
                "near_dedup": {"docs_in": 13, "docs_out": 12, "bytes_in": 3300, "bytes_out": 3000, "duplicates": 1,
                               "clusters": 1, "candidate_pairs": 3, "verified_pairs": 1, "cluster_sizes": {"2": 1}},
                "tokenize": {"seq_len": 16, "vocab_size": 300, "dropped_tail_tokens": 4,
                             "splits": {"train": {"tokens": 880}, "validation": {"tokens": 116}}}}}


def _write_data(run: Path) -> None:
    data = run / "data"
    atomic_write_json(data / "stats.json", _stats())
    for sub in ("dropped", "documents", "shards", "tokenizer"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["d1", "d2", "d3"], "reason": ["exact_dedup:duplicate", "near_dedup:duplicate",
                                                                   "quality:min_words"],
                             "duplicate_of": ["k1", "k2", ""], "source": ["a/copy.txt", "b/near.txt", "c/short.txt"]}),
                   data / "dropped" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["k1", "k2"], "text": ["the kept original text", "a near twin, kept"],
                             "source": ["a/orig.txt", "b/orig.txt"]}), data / "documents" / "part-0.parquet")
    (data / "shards" / "train-00000.parquet").write_bytes(b"shard")
    (data / "tokenizer" / "tokenizer.json").write_text("{}")


def _write_metrics(run: Path, stage: str) -> None:
    log = MetricsLog(run / stage, tensorboard=False)
    for step in range(1, 21):
        decay = math.exp(-step / 10)
        if stage == "ppo":
            log.log({"step": step, "reward_mean": 0.5 - decay, "kl": 0.1 * step, "kl_coef": 0.05,
                     "response_len": 12 + step % 3, "entropy": 4 + decay, "samples_per_s": 10.0,
                     "policy_loss": -0.01, "value_loss": decay / 5, "time_generate": 0.3})
            continue
        row = {"step": step, "loss": 3 + 2 * decay, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 5000.0 + step}
        if step % 10 == 0:
            row["val_loss"] = 3.2 + 2 * decay
        log.log(row)
    if stage == "reward":
        log.log({"eval_step": 20, "val_accuracy": 0.6, "val_margin": 0.4, "val_pairs": 10})


def _results(stages: tuple[str, ...]) -> dict:
    models = []
    for i, name in enumerate(n for n in ("pretrain", "sft", "ppo") if n in stages):
        completion = HOSTILE if name == "ppo" else f"answer of {name}"
        models.append({"name": name, "path": f"/run/{name}/model", "weights_sha256": "0" * 64, "parameters": 1234,
                       "bpb": {"bits_per_byte": 2.5 + 0.2 * i, "loss": 5.0 + 0.4 * i, "nll_nats": 1.0,
                               "tokens": 100, "bytes": 300, "tokens_per_byte": 0.333, "seq_len": 16},
                       "samples": {"format": "text" if name == "pretrain" else "chat",
                                   "items": [{"prompt": "What does `json.dumps` do?", "completion": completion,
                                              "tokens": 5}]},
                       "lm_eval": {"tasks": {"raylm_qa_mc": {"acc": 0.25 + 0.05 * i, "acc_stderr": 0.06,
                                                             "sample_len": 50}}}})
    return {"schema_version": 1, "heldout": {"source": "data:validation", "documents": 3, "bytes": 300,
                                             "truncated": False, "sha256": "ab" * 32},
            "settings": {}, "models": models,
            "reward_model": {"path": "/run/reward/model", "weights_sha256": "1" * 64, "data": "builtin",
                             "pairs": 10, "accuracy": 0.6, "margin": 0.4} if "reward" in stages else None}


def make_report_run(root: Path, stages: tuple[str, ...] = ALL_STAGES) -> Path:
    """``root/run`` as a pipeline that ran ``stages`` leaves it; returns the run directory."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "some document"}) + "\n", encoding="utf-8")
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(None, [f"data.input=[{corpus}]"])
    for stage in stages:
        if stage == "data":
            _write_data(run)
        elif stage == "eval":
            atomic_write_json(run / "eval" / "results.json", _results(stages))
        else:
            _write_metrics(run, stage)
            (run / stage / "model").mkdir(parents=True, exist_ok=True)
            (run / stage / "model" / "model.safetensors").write_bytes(stage.encode() * 10)
        atomic_write_json(run / stage / "timing.json", {"stage": stage, "seconds": 1.0 + len(stage)})
        record_stage(run, recipe, stage)
    return run
