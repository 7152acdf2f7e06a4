"""Shard reading for pretraining (fast, no Ray). ``write_shards`` also builds the run dirs of the Ray tests."""
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.config import ConfigError
from cluster.recipe import load_recipe
from pipelines.pretrain.shards import ShardBatches, load_rows, rank_slice, read_manifest
from pipelines.pretrain.stage import check_compatible

SUBJECTS = ["the cat", "a dog", "my robot", "the river", "our team", "a small bird"]
VERBS = ["sees", "likes", "follows", "paints", "builds", "finds"]
OBJECTS = ["the moon", "a red ball", "green hills", "the old tree", "a quiet song", "blue water"]


def synthetic_text(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                    for _ in range(n_sentences))


def write_shards(run_dir: Path, seq_len: int = 64, vocab_size: int = 512, train_files: int = 2,
                 train_rows: int = 96, val_rows: int = 24) -> Path:
    """A run dir with a trained tokenizer and ``data/shards`` in the format ``raylm data`` writes."""
    from pipelines.tokenizer import special_token_ids, train_tokenizer

    tok_dir = run_dir / "data" / "tokenizer"
    tok = train_tokenizer([synthetic_text(200, s) for s in range(20)], tok_dir, vocab_size=vocab_size)
    eos = special_token_ids(tok)["eos"]
    shards = run_dir / "data" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    splits, counts = {}, np.zeros(vocab_size, dtype=np.int64)
    for split, rows, files in (("train", train_rows, train_files), ("validation", val_rows, 1)):
        ids = []
        seed = 1 if split == "train" else 2
        while len(ids) < rows * seq_len:
            ids += tok.encode(synthetic_text(20, seed)) + [eos]
            seed += 7
        data = np.asarray(ids[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)
        if split == "train":
            counts += np.bincount(data.ravel(), minlength=vocab_size)
        names = []
        for i, part in enumerate(np.array_split(data, files)):
            names.append(f"{split}-{i:05d}.parquet")
            pq.write_table(pa.table({"input_ids": pa.array(list(part), type=pa.list_(pa.int32()))}), shards / names[-1])
        splits[split] = {"files": names, "sequences": rows, "tokens": rows * seq_len}
    p = counts[counts > 0] / counts.sum()
    manifest = {"seq_len": seq_len, "vocab_size": vocab_size, "tokenizer_dir": str(tok_dir.resolve()),
                "tokenizer_hash": "test", "eos_id": eos, "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
                "splits": splits}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("run"), train_rows=10, val_rows=4, train_files=3)


def test_rank_slices_cover_every_row_once():
    for total in (0, 1, 7, 10):
        for world in (1, 2, 3):
            bounds = [rank_slice(total, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_load_rows_reads_across_file_boundaries(shards):
    info = read_manifest(shards)["splits"]["train"]
    everything = load_rows(shards, info["files"], 0, 10)
    assert everything.shape == (10, 64) and everything.dtype == np.int32
    np.testing.assert_array_equal(load_rows(shards, info["files"], 3, 8), everything[3:8])


def test_each_rank_gets_its_own_rows_reshuffled_per_epoch(shards):
    batches = ShardBatches(shards, micro_batch_size=2, seed=0)
    rank0 = list(batches("train", 0, 2, epoch=0))
    rank1 = list(batches("train", 1, 2, epoch=0))
    assert len(rank0) == 2 and len(rank1) == 2  # 5 rows each, last partial micro-batch dropped
    inputs, labels = rank0[0]
    assert inputs.shape == (2, 63) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
    rows0 = {tuple(r) for x, _ in rank0 for r in x.tolist()}
    rows1 = {tuple(r) for x, _ in rank1 for r in x.tolist()}
    assert not rows0 & rows1
    again = list(ShardBatches(shards, 2, seed=0)("train", 0, 2, epoch=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rank0, again))  # deterministic, so resumable
    epochs = [torch.cat([x for x, _ in batches("train", 0, 1, epoch=e)]) for e in range(4)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    val = [torch.cat([x for x, _ in batches("validation", 0, 1, epoch=e)]) for e in range(2)]
    assert torch.equal(val[0], val[1])  # validation is never shuffled


def test_manifest_problems_name_the_file_and_key(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="run `raylm data`"):
        read_manifest(tmp_path)
    copy = shutil.copytree(shards, tmp_path / "shards")
    manifest = json.loads((copy / "manifest.json").read_text())
    for broken, match in ((dict(manifest, splits={"train": manifest["splits"]["train"]}), "splits.validation"),
                          ({k: v for k, v in manifest.items() if k != "seq_len"}, "'seq_len'")):
        (copy / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / manifest["splits"]["train"]["files"][1]).unlink()
    with pytest.raises(FileNotFoundError, match="splits.train: shard train-00001.parquet is missing"):
        read_manifest(copy)


def test_recipe_must_fit_the_shards(shards):
    manifest = read_manifest(shards)
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        check_compatible(load_recipe(None, ["model.max_seq_len=32"]), manifest, "m.json")
    piped = ["pretrain.pipeline_stages=2", "pretrain.zero_stage=1"]
    with pytest.raises(ConfigError, match="pipeline_stages: .*tie_embeddings=false"):
        check_compatible(load_recipe(None, piped + ["model.tie_embeddings=true"]), manifest, "m.json")
    check_compatible(load_recipe(None, piped), manifest, "m.json")  # tiny-cpu's head is untied
