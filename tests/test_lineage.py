"""Lineage records: a model's chain back to the corpus files by hash, and changes on disk are never silent."""
from __future__ import annotations

import hashlib
import json

import pytest

from cluster.cli import main as raylm
from cluster.recipe import load_recipe
from pipelines.lineage import chain, check_reusable, parent_entry, record_stage


def make_run(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "some document"}) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    for rel, content in [("data/shards/train-00000.parquet", b"shard"), ("data/tokenizer/tokenizer.json", b"{}"),
                         ("pretrain/model/model.safetensors", b"weights"), ("pretrain/model/config.json", b"{}")]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(content)
    recipe = load_recipe(None, [f"data.input=[{corpus}]"])
    for stage in ("data", "pretrain"):
        record_stage(run, recipe, stage)
    return corpus, run, recipe


def test_lineage_names_the_corpus_files_by_hash(tmp_path, capsys):
    corpus, run, _ = make_run(tmp_path)
    records = chain(run / "pretrain")
    assert [r["stage"] for r in records] == ["pretrain", "data"]
    data = records[1]
    assert data["inputs"] == [{"path": str(corpus), "size": corpus.stat().st_size,
                               "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}]
    assert data["recipe"]["input"] == [str(corpus)]
    assert {e["path"].rsplit("/", 1)[1] for e in records[0]["outputs"]} == {"model.safetensors", "config.json"}
    assert raylm(["lineage", str(run / "pretrain" / "model")]) == 0
    out = capsys.readouterr().out
    assert f"input  {data['inputs'][0]['sha256'][:16]}" in out and str(corpus) in out


def test_a_changed_input_or_a_rerun_parent_is_reported(tmp_path, capsys):
    corpus, run, recipe = make_run(tmp_path)
    corpus.write_text(json.dumps({"text": "edited"}) + "\n", encoding="utf-8")
    assert raylm(["lineage", str(run / "pretrain" / "model")]) == 4
    assert f"changed since recorded: {corpus}" in capsys.readouterr().out
    record_stage(run, recipe, "data")  # the data stage "reran": pretrain's model came from the old data
    assert chain(run / "pretrain")[0]["broken_parents"] == ["data"]


def test_a_base_model_is_the_input_of_its_stage_not_the_replaced_parent(tmp_path):
    _, run, _ = make_run(tmp_path)  # a pretrain record exists, but sft starts from the user's model
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (run / "sft" / "model").mkdir(parents=True)
    record_stage(run, load_recipe(None, [f"sft.base_model={mine}"]), "sft")
    [sft] = chain(run / "sft")
    assert sft["parents"] == [] and [e["path"] for e in sft["inputs"]] == [str(mine / "config.json")]


def test_a_training_stage_never_resumes_checkpoints_of_changed_inputs(tmp_path):
    corpus, run, recipe = make_run(tmp_path)
    (run / "pretrain" / "checkpoint_000001").mkdir()  # what a rerun would resume
    check_reusable(run, recipe, "pretrain")  # nothing changed: resuming is fine
    (run / "data" / "shards" / "train-00000.parquet").write_bytes(b"other shard")
    record_stage(run, recipe, "data")  # the data stage reran and wrote other shards
    with pytest.raises(ValueError, match=f"{run / 'data'} \\(the data stage's outputs changed since pretrain ran\\)"):
        check_reusable(run, recipe, "pretrain")
    assert raylm(["pretrain", "--run-dir", str(run), f"data.input=[{corpus}]"]) == 1  # before Ray or any work


@pytest.mark.ray
@pytest.mark.slow
def test_data_reruns_write_the_same_shards_and_a_changed_corpus_retrains_the_tokenizer(ray_cluster, tmp_path,
                                                                                      caplog):
    from pipelines.data.planted import planted_corpus

    planted_corpus(n_base=40).write_jsonl(tmp_path / "in", files=2)
    # several blocks and pack groups, and a tokenizer sample smaller than the corpus: every place where the order
    # of Ray Data's blocks could leak into the bytes
    args = ["data", "--input", str(tmp_path / "in"), "data.quality.languages=[]", "data.num_blocks=3",
            "data.tokenize.seq_len=64", "data.tokenize.batch_docs=8", "tokenizer.vocab_size=300",
            "tokenizer.train_docs=30"]

    def run_data(run) -> tuple[dict, str, dict]:
        assert raylm([*args, "--run-dir", str(run)]) == 0
        data = run / "data"
        stats = json.loads((data / "stats.json").read_text())["stages"]["tokenize"]
        shards = {p.name: p.read_bytes() for p in (data / "shards").glob("*.parquet")}
        return stats, (data / "tokenizer" / "tokenizer.json").read_text(), shards

    first, tokenizer, shards = run_data(tmp_path / "run")
    assert len(shards) > 3
    consumed = parent_entry(tmp_path / "run", "data")["outputs_sha256"]
    again, _, _ = run_data(tmp_path / "run")  # the same corpus: the tokenizer is reused
    assert first["tokenizer_trained"] and not again["tokenizer_trained"]
    # what pretrain reads is the same byte for byte, so pretrain still resumes from its checkpoints
    assert parent_entry(tmp_path / "run", "data")["outputs_sha256"] == consumed
    fresh, fresh_tokenizer, fresh_shards = run_data(tmp_path / "elsewhere")  # a new run dir: trained again
    assert fresh["tokenizer_trained"] and fresh_tokenizer == tokenizer and fresh_shards == shards
    changed = min((tmp_path / "in").iterdir())
    changed.write_text(changed.read_text().replace("a", "o"))
    caplog.clear()
    third, retrained, _ = run_data(tmp_path / "run")
    assert third["tokenizer_trained"] and retrained != tokenizer
    data = tmp_path / "run" / "data"
    assert f"the corpus changed since the tokenizer at {data / 'tokenizer'} was trained ({changed}" in caplog.text
