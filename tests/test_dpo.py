"""DPO: pairs split at the reply, the recipe switch in ``raylm run``, bad input refused before Ray starts, and one
real ``raylm dpo`` run on a dozen Anthropic-HH records (reference actors, Ray Train + DeepSpeed, held-out pairs).
The loss itself is checked against a plain loop in tests/test_algos.py."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import subprocess
import sys

import pytest
from test_reward import hh_records

from actors.dpo.data import encode_pair, preference_batch
from cluster.commands import default_stages
from cluster.config import ConfigError
from cluster.recipe import load_recipe
from cluster.rundir import RunDir
from pipelines.reward.data import PreferencePair


def test_pair_splits_at_the_reply_and_batches_like_a_rollout(tmp_path):
    from alignment_fixtures import build_tokenizer

    tok = build_tokenizer(tmp_path)
    pair = PreferencePair((("user", "Hi"), ("assistant", "Sure."), ("user", "What does json.dumps do?")),
                          "Serialize obj.", "It sorts a list of things.")
    prompt, chosen, rejected = encode_pair(tok, pair, max_len=256, max_prompt_len=128)
    assert tok.decode(prompt).endswith("<|assistant|>\n") and chosen[-1] == rejected[-1] == tok.eos_token_id
    assert tok.decode(chosen[:-1]) == "Serialize obj."
    short = encode_pair(tok, pair, max_len=len(prompt) + 3, max_prompt_len=len(prompt) - 2)
    assert short[0] == prompt[2:] and len(short[1]) == 5 and len(short[2]) == 5  # prompt keeps its end
    batch = preference_batch([(prompt, chosen, rejected), ([7], [8, 9], [10])], pad_id=0)
    width = len(prompt)
    assert batch["sequences"].shape == (4, width + len(rejected))
    assert batch["sequences"][1, :width].tolist() == [0] * (width - 1) + [7]  # prompts left-padded
    assert batch["response_mask"][3].tolist()[:2] == [1, 0]  # 2nd pair's rejected reply, right-padded
    assert batch["sequences"][2, width:width + len(rejected)].tolist() == rejected


def test_alignment_switch_picks_the_stages_and_the_served_model(tmp_path):
    assert default_stages("ppo") == ["data", "pretrain", "sft", "reward", "ppo", "eval", "report", "serve"]
    assert default_stages("dpo") == ["data", "pretrain", "sft", "dpo", "eval", "report", "serve"]
    from pipelines.eval.stage import resolve_models

    run_dir = RunDir.create(tmp_path)
    for stage in ("sft", "ppo", "dpo"):
        run_dir.model_dir(stage).mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):  # what eval's dir check looks for
            (run_dir.model_dir(stage) / name).write_text("{}")
    assert run_dir.latest_model("dpo") == run_dir.model_dir("dpo")  # what `raylm serve` serves
    assert run_dir.latest_model("ppo") == run_dir.model_dir("ppo")
    specs = resolve_models(load_recipe().eval, run_dir)
    assert [(s.name, s.chat) for s in specs] == [("sft", True), ("ppo", True), ("dpo", True)]


def test_preflight_wants_the_sft_model_unless_the_same_run_trains_it(tmp_path):
    from actors.dpo.stage import preflight
    from cluster.stage import StageContext

    run_dir = RunDir.create(tmp_path)
    preflight(StageContext(recipe=load_recipe(), run_dir=run_dir, options={"stages": ["sft", "dpo"]}))
    with pytest.raises(FileNotFoundError, match="dpo needs the sft model"):
        preflight(StageContext(recipe=load_recipe(), run_dir=run_dir, options={"stages": ["dpo"]}))


@pytest.mark.parametrize("override,match", [("dpo.beta=0", "dpo.beta: must be > 0"),
                                            ("dpo.max_prompt_len=300", "dpo.max_prompt_len: must be in"),
                                            ("alignment=rlhf", "alignment: expected .ppo. or .dpo., got .rlhf.")])
def test_bad_dpo_recipe_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(overrides=[override])


@pytest.mark.parametrize("bad_data", [False, True])
def test_bad_input_fails_before_ray_starts(tmp_path, bad_data):
    # A subprocess: the session's Ray cluster (if another test started it) must not mask a Ray start here.
    args = [sys.executable, "-m", "cluster.cli", "dpo", "--run-dir", str(tmp_path / "run")]
    if bad_data:
        (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
        args += ["--data", str(tmp_path / "pairs.jsonl")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    want = f"{tmp_path / 'pairs.jsonl'}:1: rejected: needs a string" if bad_data else \
        f"dpo needs the sft model at {tmp_path / 'run' / 'sft' / 'model'}"
    assert want in out.stderr
    assert "Ray cluster" not in out.stderr and not (tmp_path / "run" / "dpo").exists()


@pytest.mark.ray
@pytest.mark.deepspeed
def test_raylm_dpo_on_hh_pairs_reports_heldout_accuracy_and_exports(ray_cluster, tmp_path):
    from alignment_fixtures import build_causal_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.cli import main
    from cluster.rundir import read_metrics

    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in hh_records()) + "\n")
    run_dir = RunDir.create(tmp_path / "run")
    build_causal_lm(run_dir.model_dir("sft"))
    assert main(["dpo", "--run-dir", str(run_dir.root), "--data", str(data), "dpo.num_workers=2",
                 "dpo.micro_batch_size=2", "dpo.max_steps=4", "dpo.warmup_steps=1", "dpo.eval_every=2",
                 "dpo.eval_batches=1", "dpo.checkpoint_every=4", "dpo.val_fraction=0.34", "dpo.lr=5.0e-3",
                 "dpo.reference_batch_size=3", "dpo.reference.replicas=2"]) == 0
    stage = run_dir.root / "dpo"
    steps = [m for m in read_metrics(stage) if "step" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # The policy starts as the reference: the first loss is log 2, every reward 0 (reference log-probs agree).
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(steps[0]["margin"]) < 1e-3
    for key in ("chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert all(math.isfinite(m[key]) for m in steps)
    held = json.loads((stage / "heldout.json").read_text())
    assert held["val_pairs"] == 4 and 0 <= held["val_accuracy"] <= 1 and math.isfinite(held["val_margin"])
    assert 0 <= held["val_logp_accuracy_before"] <= 1
    assert [m for m in read_metrics(stage) if "eval_step" in m][-1]["val_accuracy"] == held["val_accuracy"]
    rows = json.loads((stage / "data" / "train.json").read_text())
    assert len(rows) == 8 and all(r[3] < 0 and r[4] < 0 for r in rows)  # reference log-probs ride with the pairs
    model_dir = run_dir.model_dir("dpo")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    lineage = json.loads((stage / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and any(e["path"] == str(data) for e in lineage["inputs"])
    assert any(e["path"].endswith("model.safetensors") for e in lineage["outputs"])


def test_reference_logprobs_are_reused_for_the_same_weights_and_pairs(tmp_path):
    from actors.dpo.stage import reference_logps
    from cluster.config import atomic_write_json
    from pipelines.eval.model_eval import weights_sha256

    base, data_dir = tmp_path / "sft", tmp_path / "data"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    rows = [([1, 2], [3, 4], [5])]
    key = {"sft_weights_sha256": weights_sha256(base),
           "pairs_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}
    atomic_write_json(data_dir / "reference.json", {"key": key, "logps": [[-1.5, -2.5]]})
    cfg = load_recipe().dpo
    assert reference_logps(base, rows, data_dir, cfg, pad_id=0) == ([(-1.5, -2.5)], True)  # no Ray needed
