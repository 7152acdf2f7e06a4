"""Reward model: preference records (prompt/chosen/rejected and Anthropic HH transcripts), the pairwise loss,
scores read at the last real token, and one real end-to-end ``raylm reward`` run on a dozen HH records."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from pipelines.reward.data import read_pairs, split_hh
from pipelines.reward.model import last_token_index
from pipelines.reward.task import pairwise_loss

HH_QUESTIONS = [("What does `json.dumps` do?", "Serialize obj to a JSON formatted str.", "It sorts a list."),
                ("What does `json.loads` do?", "Deserialize s to a Python object.", "It opens a socket."),
                ("What does `textwrap.dedent` do?", "Remove any common leading whitespace.", "It adds tabs."),
                ("What does `shutil.copy` do?", "Copy data and mode bits.", "It deletes the file."),
                ("What does `glob.glob` do?", "Return a list of paths matching a pathname pattern.", "Nothing."),
                ("What does `heapq.heappush` do?", "Push item onto heap, maintaining the heap invariant.", "Pop."),
                ("What does `bisect.insort` do?", "Insert item x in list a, and keep it sorted.", "Reverse it."),
                ("What does `random.choice` do?", "Choose a random element from a non-empty sequence.", "Sum."),
                ("What does `statistics.mean` do?", "Return the sample arithmetic mean of data.", "The max."),
                ("What does `base64.b64encode` do?", "Encode the bytes-like object s using Base64.", "Zip it."),
                ("What does `copy.deepcopy` do?", "Deep copy operation on arbitrary Python objects.", "A lie."),
                ("What does `fnmatch.fnmatch` do?", "Test whether FILENAME matches PATTERN.", "Prints it.")]


def hh_records() -> list[dict]:
    out = []
    for i, (q, good, bad) in enumerate(HH_QUESTIONS):
        prefix = f"\n\nHuman: Hi, a question.\n\nAssistant: Sure.\n\nHuman: {q}" if i % 2 else f"\n\nHuman: {q}"
        out.append({"chosen": f"{prefix}\n\nAssistant: {good}", "rejected": f"{prefix}\n\nAssistant: {bad}"})
    return out


def test_split_hh_uses_shared_prefix_as_prompt():
    rec = hh_records()[1]
    pair = split_hh(rec["chosen"], rec["rejected"], "x:1")
    assert pair.prompt == (("user", "Hi, a question."), ("assistant", "Sure."),
                           ("user", "What does `json.loads` do?"))
    assert pair.chosen == "Deserialize s to a Python object." and pair.rejected == "It opens a socket."


def test_read_pairs_hh_gz_and_prompt_records(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for rec in hh_records()[:3] + [{"prompt": "p?", "chosen": "a", "rejected": "b"}]:
            fh.write(json.dumps(rec) + "\n")
    pairs = read_pairs(path)
    assert len(pairs) == 4 and pairs[3].prompt == (("user", "p?"),) and pairs[0].chosen.startswith("Serialize")


@pytest.mark.parametrize("record,match", [
    ({"chosen": "no turns", "rejected": "other"}, r"bad\.jsonl:1: chosen/rejected: no shared prefix"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, r"bad\.jsonl:1: rejected: needs a string"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"bad\.jsonl:1: prompt: must be a string"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=match):
        read_pairs(path)


def test_last_token_index_handles_left_and_right_padding():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 2]


class _FixedScores(torch.nn.Module):
    """A stand-in score head (not the thing under test: the loss arithmetic is)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def get_decoder(self):
        return lambda **kw: type("Out", (), {"last_hidden_state": self.scores.view(-1, 1, 1).expand(-1, 2, 1)})()

    def score(self, hidden):
        return hidden


def test_pairwise_loss_matches_formula():
    batch = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "attention_mask": torch.ones(4, 2, dtype=torch.long)}
    loss, stats = pairwise_loss(_FixedScores([2.0, -1.0, 0.5, 0.0]), batch, margin=0.5)
    want = (-math.log(1 / (1 + math.exp(-(1.5 - 0.5)))) - math.log(1 / (1 + math.exp(-(-1.0 - 0.5))))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats == {"accuracy": 0.5, "margin": pytest.approx(0.25)}


@pytest.mark.ray
@pytest.mark.deepspeed
def test_reward_stage_trains_on_hh_file(ray_cluster, tmp_path):
    from alignment_fixtures import build_causal_lm

    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir, read_metrics
    from cluster.stage import StageContext
    from pipelines.hf_models import load_reward_model
    from pipelines.reward.stage import run

    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in hh_records()) + "\n")
    run_dir = RunDir.create(tmp_path / "run")
    build_causal_lm(run_dir.model_dir("sft"))
    recipe = load_recipe(overrides=[f"reward.data={data}", "reward.num_workers=2", "reward.micro_batch_size=2",
                                    "reward.max_steps=6", "reward.warmup_steps=1", "reward.eval_every=3",
                                    "reward.eval_batches=1", "reward.checkpoint_every=6", "reward.val_fraction=0.34",
                                    "reward.lr=5.0e-3"])
    summary = run(StageContext(recipe=recipe, run_dir=run_dir))
    assert summary["train_pairs"] == 8 and summary["val_pairs"] == 4 and summary["steps"] == 6
    metrics = read_metrics(run_dir.stage("reward"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    final = [m for m in metrics if "val_accuracy" in m][-1]
    assert 0.0 <= final["val_accuracy"] <= 1.0 and math.isfinite(final["val_margin"]) and final["val_pairs"] == 4
    model = load_reward_model(run_dir.model_dir("reward"))
    assert model.config.num_labels == 1
