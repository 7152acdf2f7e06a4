"""The whole ``raylm data`` stage on Ray (session cluster): planted duplicates, the shard contract,
determinism across reruns and worker counts, and bad input files."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.recipe import load_recipe
from cluster.rundir import RunDir
from cluster.stage import StageContext
from pipelines.data.planted import planted_corpus
from pipelines.data.stage import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEQ_LEN = 64


def _recipe(inputs: list[Path], *extra: str):
    return load_recipe(None, [
        f"data.input={json.dumps([str(p) for p in inputs])}",
        "data.quality.languages=[]",  # generated words are no language; language ID has its own unit tests
        "data.num_blocks=3", f"data.tokenize.seq_len={SEQ_LEN}", "data.tokenize.batch_docs=64",
        "data.tokenize.val_fraction=0.2", "tokenizer.vocab_size=400", "tokenizer.train_docs=100", *extra])


def _run(tmp: Path, inputs: list[Path], *extra: str) -> tuple[dict, Path]:
    ctx = StageContext(recipe=_recipe(inputs, *extra), run_dir=RunDir.create(tmp))
    return run(ctx), tmp / "data"


def _table(directory: Path):
    return pq.read_table(sorted(directory.glob("*.parquet"))).to_pylist() if any(directory.glob("*.parquet")) \
        else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    planted = planted_corpus(n_base=60)
    root = tmp_path_factory.mktemp("corpus")
    planted.write_jsonl(root / "in", files=3)
    return planted, root / "in"


@pytest.fixture(scope="module")
def first_run(ray_cluster, corpus, tmp_path_factory):
    _, inputs = corpus
    out = tmp_path_factory.mktemp("run1")
    summary, data_dir = _run(out, [inputs])
    return summary, data_dir


def test_planted_duplicates_are_dropped_to_their_cluster_and_negatives_kept(corpus, first_run):
    planted, _ = corpus
    _, data_dir = first_run
    kept = {r["id"] for r in _table(data_dir / "documents")}
    dropped = {r["id"]: r for r in _table(data_dir / "dropped")}
    assert set(kept) | set(dropped) == {d["id"] for d in planted.docs} and not kept & set(dropped)
    for cluster in planted.clusters:
        keeper = min(cluster)
        assert keeper in kept, cluster
        for doc_id in cluster - {keeper}:
            assert doc_id in dropped, (doc_id, cluster)
            assert dropped[doc_id]["duplicate_of"] == keeper
            assert dropped[doc_id]["reason"] in ("exact_dedup:duplicate", "near_dedup:duplicate")
    assert set(planted.hard_negatives) <= kept
    planted_dups = sum(len(c) - 1 for c in planted.clusters)
    assert len(dropped) == planted_dups  # nothing else was removed
    reasons = {r["reason"] for r in dropped.values()}
    assert reasons == {"exact_dedup:duplicate", "near_dedup:duplicate"}


def test_shards_follow_the_contract(first_run):
    from pipelines.tokenizer import EOS, load_tokenizer, tokenizer_hash

    _, data_dir = first_run
    manifest = json.loads((data_dir / "shards" / "manifest.json").read_text())
    tok = load_tokenizer(manifest["tokenizer_dir"])
    assert manifest["eos_id"] == tok.convert_tokens_to_ids(EOS)
    assert manifest["tokenizer_hash"] == tokenizer_hash(manifest["tokenizer_dir"])
    assert manifest["seq_len"] == SEQ_LEN and manifest["vocab_size"] == len(tok)
    assert 0 < manifest["unigram_entropy_nats"] < 7
    for split in ("train", "validation"):
        info = manifest["splits"][split]
        assert info["sequences"] > 0 and info["files"]
        table = pq.read_table([data_dir / "shards" / f for f in info["files"]])
        assert str(table.schema.field("input_ids").type) == "list<element: int32>"
        assert str(table.schema.field("doc_starts").type) == "list<element: int32>"
        assert table.num_rows == info["sequences"] and info["tokens"] == info["sequences"] * SEQ_LEN
        rows = table.to_pylist()
        assert all(len(r["input_ids"]) == SEQ_LEN for r in rows)
        for row in rows:
            # a document starts right after every EOS inside a row, and nowhere else
            eos_at = [i for i, t in enumerate(row["input_ids"][:-1]) if t == manifest["eos_id"]]
            assert [i + 1 for i in eos_at] == [s for s in row["doc_starts"] if s > 0]
    text = tok.decode(rows[0]["input_ids"])
    assert EOS in text or rows[0]["doc_starts"] == [0]
    assert sorted(p.name for p in (data_dir / "shards").iterdir() if p.name.startswith(".")) == []


def test_stats_report_every_stage(first_run, corpus):
    planted, _ = corpus
    summary, data_dir = first_run
    stats = json.loads((data_dir / "stats.json").read_text())
    stages = stats["stages"]
    assert stages["input"]["docs_in"] == len(planted.docs) == summary["docs_in"]
    assert stages["exact_dedup"]["duplicates"] == 10 and stages["exact_dedup"]["cluster_sizes"] == {"2": 10}
    assert stages["near_dedup"]["duplicates"] == 11 and stages["near_dedup"]["cluster_sizes"] == {"2": 9, "3": 1}
    assert stages["tokenize"]["splits"]["train"]["tokens"] == summary["train_tokens"]
    assert set(stats["throughput"]) >= {"read+clean", "exact_dedup", "near_dedup", "tokenize"}
    assert stats["skipped_files"] == []


def test_same_kept_set_on_rerun_with_one_and_two_workers(ray_cluster, corpus, first_run, tmp_path):
    from ray.data import DataContext

    _, inputs = corpus
    first = {r["id"] for r in _table(first_run[1] / "documents")}
    context = DataContext.get_current()
    saved = context.execution_options.resource_limits
    try:
        for cpus, blocks in ((1, 1), (2, 5)):
            context.execution_options.resource_limits = saved.copy(cpu=cpus)
            _, data_dir = _run(tmp_path / f"w{cpus}", [inputs], f"data.num_blocks={blocks}", "data.tokenize.enabled=false")
            assert {r["id"] for r in _table(data_dir / "documents")} == first
    finally:
        context.execution_options.resource_limits = saved


def test_corrupt_file_fails_with_its_name_and_no_manifest(ray_cluster, corpus, tmp_path):
    _, inputs = corpus
    bad = tmp_path / "bad" / "broken.jsonl.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(b'{"text": "fine line"}\n')[:-12])  # truncated gzip stream
    run_dir = tmp_path / "run"
    (run_dir / "data" / "shards").mkdir(parents=True)
    (run_dir / "data" / "shards" / "manifest.json").write_text("{}")  # stale, from an earlier run
    from pipelines.data.sources import CorpusReadError

    with pytest.raises(CorpusReadError, match=r"^\S*broken\.jsonl\.gz: "):
        _run(run_dir, [inputs, bad.parent])
    assert not (run_dir / "data" / "shards" / "manifest.json").exists()


def test_corrupt_file_is_skipped_and_recorded(ray_cluster, corpus, tmp_path):
    _, inputs = corpus
    bad = tmp_path / "bad" / "broken.jsonl"
    bad.parent.mkdir()
    bad.write_bytes(b'{"text": "ok"}\n{"text": "no closing quote}\n')
    _, data_dir = _run(tmp_path / "run", [inputs, bad], "data.on_error=skip", "data.near_dedup.enabled=false")
    stats = json.loads((data_dir / "stats.json").read_text())
    assert [s["path"] for s in stats["skipped_files"]] == [str(bad)]
    assert "line 2" in stats["skipped_files"][0]["error"]
    assert (data_dir / "shards" / "manifest.json").exists()


def test_nothing_passing_the_filters_is_a_clear_error(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "short.jsonl").write_text('{"text": "too short"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="no document passed"):
        _run(tmp_path / "run", [tmp_path / "in"])
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["stages"]["quality"]["dropped"]["min_words"]["docs"] == 1
    assert stats["stages"]["normalize"]["dropped"]["empty"]["docs"] == 1
    assert not (tmp_path / "run" / "data" / "shards" / "manifest.json").exists()
