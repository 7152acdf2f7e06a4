"""raylm eval: bits per byte against a plain loop, results.json on a run dir (reproducible), bad input first,
and the parallel path (one Ray task per model) on the session cluster."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.cli import main as raylm
from cluster.recipe import load_recipe
from cluster.rundir import RunDir, read_metrics
from cluster.stage import StageContext
from pipelines.data.pack import is_validation
from pipelines.eval.heldout import cap_bytes
from pipelines.eval.scoring import bits_per_byte
from pipelines.eval.stage import evaluate, run
from pipelines.hf_models import init_reward_model

VAL_FRACTION = 0.5
TASKS = ("eval.tasks=[raylm_qa_mc]", "eval.task_limit=3")
DOCS = [f"Document {i}: the function `json.dumps` returns a JSON string ({'é' * (i % 3)}), {i * 7} times."
        for i in range(12)]


def build_tiny_model(out: Path, seed: int) -> Path:
    """The project tokenizer on a few sentences and a random 2-layer Llama (what serve/tiny_model.py builds,
    smaller); seeds give different weights over the same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.tokenizer import train_tokenizer

    tok = train_tokenizer(DOCS * 3, out, vocab_size=300)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run dir as the pipeline leaves it, for eval: data/documents, pretrain + sft models, a reward model."""
    root = tmp_path_factory.mktemp("evalrun")
    build_tiny_model(root / "pretrain" / "model", seed=0)
    build_tiny_model(root / "sft" / "model", seed=1)
    reward = init_reward_model(root / "sft" / "model")  # the reward stage's start: SFT body, fresh scalar head
    reward.save_pretrained(root / "reward" / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(root / "sft" / "model" / name, root / "reward" / "model" / name)
    docs = root / "data" / "documents"
    docs.mkdir(parents=True)
    ids = [f"doc{i:03d}" for i in range(len(DOCS))]
    pq.write_table(pa.table({"id": ids[::-1], "text": DOCS[::-1]}), docs / "part-0.parquet")  # not in id order
    return root


def context(run_dir: Path, *overrides: str) -> StageContext:
    recipe = load_recipe(None, [f"data.tokenize.val_fraction={VAL_FRACTION}", "eval.max_new_tokens=4",
                                "eval.seq_len=16", "eval.batch_size=3", *overrides])
    return StageContext(recipe=recipe, run_dir=RunDir.create(run_dir))


def test_bits_per_byte_matches_a_plain_loop(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run / "pretrain" / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    got = bits_per_byte(model, tok, DOCS[:5], seq_len=16, batch_size=3, where=str(path))
    nll = 0.0
    for text in DOCS[:5]:  # each window alone, unpadded: [EOS] + tokens cut every 16
        tokens = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        for start in range(0, len(tokens) - 1, 16):
            window = torch.tensor([tokens[start:start + 17]])
            with torch.no_grad():
                logp = model(window[:, :-1]).logits.log_softmax(-1)[0]
            nll -= logp.gather(1, window[0, 1:, None]).sum().item()
    n_bytes = sum(len(t.encode()) for t in DOCS[:5])
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, abs=2e-5)


def test_lm_eval_bits_per_byte_agrees_with_ours(tiny_run, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is a dependency: `make install` adds it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.eval.lm_tasks import run_tasks, write_local_tasks

    path = tiny_run / "pretrain" / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    # one window per document (lm-eval's max_length is the model's 256 positions): the same sums
    ours = bits_per_byte(model, tok, DOCS[:5], seq_len=256, batch_size=4, where=str(path))
    tasks_dir = write_local_tasks(tmp_path / "tasks", DOCS[:5], sft_val_fraction=0.1)
    theirs = run_tasks(model, tok, ["raylm_heldout"], tasks_dir, chat=False, batch_size=4, limit=None)
    assert theirs["n_samples"] == {"raylm_heldout": 5}
    assert theirs["tasks"]["raylm_heldout"]["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], abs=2e-5)


def test_qa_multiple_choice_is_fixed_and_well_formed():
    from pipelines.eval.lm_tasks import qa_multiple_choice

    docs = qa_multiple_choice(0.1)  # the distractors are drawn with a per-question seed: fixed by construction
    assert len(docs) > 20
    for doc in docs:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
    assert len({d["label"] for d in docs}) == 4  # the true answer is not always in one place


def test_cap_bytes_cuts_whole_documents_then_at_a_character_boundary():
    assert cap_bytes(["abc", "dé"], 100) == (["abc", "dé"], False)
    assert cap_bytes(["abc", "dé"], 5) == (["abc", "d"], True)  # 'é' is 2 bytes: not split in half
    assert cap_bytes(["abc", "dé"], 3) == (["abc"], True)


def test_eval_on_a_run_dir_writes_results_that_a_rerun_reproduces(tiny_run):
    pytest.importorskip("lm_eval", reason="lm-eval is a dependency: `make install` adds it")
    summary = evaluate(context(tiny_run, *TASKS), parallel=False)
    results_path = tiny_run / "eval" / "results.json"
    first = results_path.read_bytes()
    results = json.loads(first)
    assert summary["results"] == str(results_path)
    held = [d for i, d in enumerate(DOCS) if is_validation(f"doc{i:03d}", VAL_FRACTION)]
    assert results["heldout"]["source"] == "data:validation"
    assert results["heldout"]["documents"] == len(held) > 0
    assert results["heldout"]["bytes"] == sum(len(d.encode()) for d in held)
    assert [m["name"] for m in results["models"]] == ["pretrain", "sft"]
    pretrain, sft = results["models"]
    assert pretrain["bpb"]["bits_per_byte"] != sft["bpb"]["bits_per_byte"]  # different weights, same text
    assert pretrain["samples"]["format"] == "text" and sft["samples"]["format"] == "chat"
    assert [s["prompt"] for s in sft["samples"]["items"]] == results["settings"]["prompts"]
    for model in (pretrain, sft):
        assert model["lm_eval"]["n_samples"] == {"raylm_qa_mc": 3}
        acc = model["lm_eval"]["tasks"]["raylm_qa_mc"]["acc"]
        assert 0 <= acc <= 1 and acc * 3 == pytest.approx(round(acc * 3), abs=1e-4)  # k of 3 questions
    assert (pretrain["lm_eval"]["chat_template"], sft["lm_eval"]["chat_template"]) == (False, True)
    reward = results["reward_model"]
    assert reward["pairs"] > 10 and 0 <= reward["accuracy"] <= 1 and reward["data"] == "builtin"
    policy = results["policy"]  # no ppo model in this run: sft alone, the reference of itself
    assert policy["prompts"]["count"] == 50 and policy["models"]["sft"]["kl_to_sft"] == 0.0
    assert policy["models"]["sft"]["win_rate_vs_sft"] is None and "reward_mean" in policy["models"]["sft"]
    evaluate(context(tiny_run, *TASKS), parallel=False)
    assert results_path.read_bytes() == first
    assert [m["model"] for m in read_metrics(tiny_run / "eval")] == ["pretrain", "sft", "reward", "sft"] * 2


def test_user_text_and_model_dirs(tiny_run, tmp_path):
    text = tmp_path / "held.jsonl"
    text.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:2]), encoding="utf-8")
    model = tiny_run / "sft" / "model"
    evaluate(context(tmp_path / "run", f"eval.text=[{text}]", f"eval.models=[{model}]"), parallel=False)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["heldout"]["bytes"] == sum(len(d.encode()) for d in DOCS[:2])
    assert [(m["name"], m["path"]) for m in results["models"]] == [("sft", str(model))]
    assert results["reward_model"] is None  # models named by hand: the run's reward model is not theirs


def test_bad_input_fails_before_ray_starts_naming_it(tiny_run, tmp_path, capsys):
    import ray

    was_up = ray.is_initialized()
    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("caf\xe9".encode("latin-1"))
    cases = [(["--model", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: model directory not found"),
             (["--text", str(bad_text)], f"{bad_text}: not UTF-8 text"),
             (["--text", str(tmp_path / "nope.txt")], f"{tmp_path / 'nope.txt'}: held-out text file not found")]
    for args, message in cases:
        assert raylm(["eval", "--run-dir", str(tiny_run), *args]) == 1
        assert message in capsys.readouterr().err
    assert ray.is_initialized() == was_up
    with pytest.raises(FileNotFoundError, match="no trained model"):
        evaluate(context(tmp_path / "empty"), parallel=False)


@pytest.mark.ray
def test_parallel_eval_one_ray_task_per_model_gives_the_same_results(ray_cluster, tiny_run, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is a dependency: `make install` adds it")
    if not (tiny_run / "eval" / "results.json").exists():  # this test alone (-k): the in-process baseline
        evaluate(context(tiny_run, *TASKS), parallel=False)
    local = json.loads((tiny_run / "eval" / "results.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    run(context(run_dir, *TASKS))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["pretrain", "sft"]
    assert all(m["pid"] != os.getpid() for m in read_metrics(run_dir / "eval"))  # evaluated in Ray workers
    # the same numbers as in-process, one thread there and two here (paths differ: another run dir)
    assert [m["bpb"] for m in results["models"]] == [m["bpb"] for m in local["models"]]
    for key in ("samples", "lm_eval"):
        assert [m[key] for m in results["models"]] == [m[key] for m in local["models"]]
    assert {**results["reward_model"], "path": ""} == {**local["reward_model"], "path": ""}
    assert results["policy"]["models"] == local["policy"]["models"]


def test_policy_quality_against_the_sft_reference(tiny_run, tmp_path):
    from pipelines.eval.policy import evaluate_policies, response_kls

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d[:30]}) + "\n" for d in DOCS[:6]), encoding="utf-8")
    recipe = load_recipe(None, ["ppo.max_new_tokens=8", f"ppo.prompts={prompts}"])
    paths = {"sft": str(tiny_run / "sft" / "model"), "ppo": str(tiny_run / "pretrain" / "model")}  # another policy
    got = evaluate_policies(paths, str(tiny_run / "reward" / "model"), recipe)
    sft, other = got["models"]["sft"], got["models"]["ppo"]
    assert sft["kl_to_sft"] == 0.0 and other["kl_to_sft"] > 0  # different weights, same tokenizer
    assert 0 <= other["win_rate_vs_sft"] <= 1 and sft["win_rate_vs_sft"] is None
    assert 1 <= other["response_tokens_mean"] <= 8 and got["prompts"]["count"] == 6
    assert evaluate_policies(paths, str(tiny_run / "reward" / "model"), recipe)["models"] == got["models"]
    from transformers import AutoModelForCausalLM

    # the KLs of a right-padded batch against a plain per-position loop over the vocabulary, one response alone
    p, q = (AutoModelForCausalLM.from_pretrained(paths[k]).eval() for k in ("ppo", "sft"))
    prompts, responses = [[5, 6, 7], [9]], [[8, 9], [4, 5, 6, 7]]
    for prompt, response, got_kl in zip(prompts, responses, response_kls(p, q, prompts, responses, pad_id=0)):
        want = 0.0
        for t in range(len(response)):
            ids = torch.tensor([prompt + response[:t]])
            with torch.no_grad():
                lp, lq = p(ids).logits[0, -1].log_softmax(-1), q(ids).logits[0, -1].log_softmax(-1)
            want += float(sum(lp[v].exp() * (lp[v] - lq[v]) for v in range(lp.shape[0])))
        assert got_kl == pytest.approx(want, rel=1e-4)
