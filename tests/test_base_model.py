"""Starting from a model the user already has (``--model`` / ``sft.base_model``, ``reward.base_model``,
``ppo.policy_model``): checks that fail before Ray starts, chat templates without ``{% generation %}`` tags, and
the chain sft -> reward -> ppo -> serve on tiny random non-Llama models (Qwen3, GPT-NeoX) built here."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cluster.cli import main as raylm
from pipelines.chat.records import IGNORE, encode_chat
from pipelines.hf_models import check_base_model, load_tokenizer

ARCHS = ("qwen3", "gpt_neox")
SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke-cpu.yaml"
CHAT = [{"role": "user", "content": "What does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize obj."},
        {"role": "user", "content": "And `json.loads`?"},
        {"role": "assistant", "content": "Deserialize s."}]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    from alignment_fixtures import build_foreign_causal_lm

    root = tmp_path_factory.mktemp("foreign")
    return {arch: build_foreign_causal_lm(root / arch, arch) for arch in ARCHS}


def test_own_template_without_generation_tags_learns_assistant_turns_only(foreign):
    tok = load_tokenizer(foreign["qwen3"])
    assert "{% generation %}" not in tok.chat_template  # ChatML, as the model brought it
    ids, labels = encode_chat(tok, CHAT, max_len=256)
    assert tok.decode([t for t in labels if t != IGNORE]) == "Serialize obj.<|im_end|>\nDeserialize s.<|im_end|>\n"
    assert tok.decode(ids).startswith("<|im_start|>user\nWhat does")


def test_missing_template_and_pad_get_the_projects(foreign):
    tok = load_tokenizer(foreign["gpt_neox"])
    assert tok.pad_token == tok.eos_token and "{% generation %}" in tok.chat_template
    _, labels = encode_chat(tok, CHAT, max_len=256)
    assert tok.decode([t for t in labels if t != IGNORE]) == "Serialize obj.<|eos|>Deserialize s.<|eos|>"


def _broken(tmp_path: Path, foreign: dict, what: str) -> str:
    """A copy of the GPT-NeoX model dir with one thing wrong."""
    import shutil

    from transformers import AutoConfig, GPTNeoXForSequenceClassification, T5Config

    d = tmp_path / what
    shutil.copytree(foreign["gpt_neox"], d)
    if what == "no_config":
        (d / "config.json").unlink()
    elif what == "no_weights":
        (d / "model.safetensors").unlink()
    elif what == "no_tokenizer":
        for f in d.glob("tokenizer*"):
            f.unlink()
    elif what == "classifier":  # a reward model where a language model belongs
        GPTNeoXForSequenceClassification(AutoConfig.from_pretrained(d, num_labels=1)).save_pretrained(d)
    elif what == "encoder_decoder":
        T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("what,match", [
    ("no_config", r"not a Hugging Face model directory \(missing config.json\)"),
    ("no_weights", r"missing model.safetensors or pytorch_model.bin"),
    ("no_tokenizer", r"no tokenizer transformers can load"),
    ("classifier", r"GPTNeoXForSequenceClassification checkpoint has no causal-LM head"),
    ("encoder_decoder", r"model_type 't5' has no causal-LM class"),
])
def test_unusable_model_is_named(tmp_path, foreign, what, match):
    with pytest.raises((ValueError, FileNotFoundError), match=r"sft.base_model: .*" + match):
        check_base_model(_broken(tmp_path, foreign, what), "sft.base_model", 128, "sft.max_len")


def test_cli_fails_before_ray_starts_naming_the_key(tmp_path, foreign, capsys):
    import ray

    started = ray.is_initialized()  # the session cluster, if a test before this one started it
    args = ["--run-dir", str(tmp_path / "run"), "-c", str(SMOKE)]
    assert raylm(["sft", "--model", str(tmp_path / "nowhere"), *args]) == 1
    assert f"sft.base_model: {tmp_path / 'nowhere'}: no such model directory" in capsys.readouterr().err
    assert raylm(["run", "--model", str(foreign["qwen3"]), *args, "sft.max_len=512"]) == 1
    assert "the model's context is 256 tokens, shorter than sft.max_len=512" in capsys.readouterr().err
    assert raylm(["ppo", "--model", str(foreign["qwen3"]), *args, "ppo.max_new_tokens=250"]) == 1
    assert "shorter than max_prompt_len + max_new_tokens=298" in capsys.readouterr().err
    assert ray.is_initialized() == started  # every failure came before Ray


def test_serve_engine_refuses_sliding_window_caches(tmp_path):
    from transformers import MistralConfig

    from serve.engine import check_cache_layers

    check_cache_layers(MistralConfig(num_hidden_layers=1, sliding_window=None), tmp_path)  # full attention: fine
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer layers .*serve.engine=vllm"):
        check_cache_layers(MistralConfig(num_hidden_layers=1, sliding_window=16), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_on_non_llama_caches_matches_solo_runs(foreign, arch):
    """The hf engine's cache surgery (left-pad and concatenate rows joining mid-flight, drop rows that leave)
    on Qwen3 (GQA, q/k norms) and GPT-NeoX (partial rotary) caches: each request gets what it gets alone."""
    from serve.batching import RunningBatch, generate
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    engine = Engine(foreign[arch])
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    solo = lambda p, n: "".join(d[0].text for d in generate(engine, [p], [greedy(n)]) if d[0])
    a = engine.text_prompt_ids("What does `json.dumps` do? Serialize obj to a JSON formatted str.")
    b, c = engine.text_prompt_ids("Return"), engine.text_prompt_ids("The os module")
    batch, texts = RunningBatch(engine), {"a": "", "b": "", "c": ""}
    batch.add(["a", "c"], [a, c], [greedy(12), greedy(3)])  # c leaves early: its padding columns are trimmed
    for step in range(12):
        if step == 4:
            batch.add(["b"], [b], [greedy(5)])  # b joins mid-flight with a shorter prompt than a's history
        for key, delta in batch.sample():
            texts[key] += delta.text
        batch.forward()
    assert len(batch) == 0 and texts == {"a": solo(a, 12), "b": solo(b, 5), "c": solo(c, 3)}
    assert all(texts.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHEAP = [f"{stage}.{k}" for stage in ("sft", "reward") for k in (
    "num_workers=1", "max_steps=2", "warmup_steps=1", "eval_every=2", "eval_batches=1", "checkpoint_every=2")] + [
    "ppo.iterations=1", "ppo.checkpoint_every=1", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=4"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.serve
@pytest.mark.parametrize("arch,algorithm", [("qwen3", "ppo"), ("gpt_neox", "grpo")])
def test_run_from_own_model_sft_reward_ppo_serve(ray_cluster, foreign, tmp_path, capsys, arch, algorithm):
    """``raylm run --model DIR``: no data or pretrain stage; sft, reward and ppo (PPO with its critic on one
    architecture, GRPO on the other: cheaper) keep the model's architecture and tokenizer; the hf engine serves
    the result."""
    from openai import OpenAI
    from ray import serve
    from transformers import AutoConfig

    port, run_dir = free_port(), tmp_path / "run"
    try:
        assert raylm(["run", "--model", str(foreign[arch]), "-c", str(SMOKE), "--run-dir", str(run_dir),
                      "--no-block", f"serve.port={port}", f"ppo.algorithm={algorithm}", "ppo.group_size=2",
                      *CHEAP]) == 0
        err = capsys.readouterr().err
        stages = ["sft", "reward", "ppo", "report", "serve"]  # no data, pretrain; no eval without eval.text
        for i, stage in enumerate(stages, start=1):
            assert f"[{i}/{len(stages)}] {stage}: done in" in err
        assert not (run_dir / "data").exists() and not (run_dir / "pretrain").exists()
        want = AutoConfig.from_pretrained(foreign[arch]).model_type
        for stage in ("sft", "reward", "ppo"):
            assert AutoConfig.from_pretrained(run_dir / stage / "model").model_type == want, stage
        assert load_tokenizer(run_dir / "ppo" / "model").get_vocab() == load_tokenizer(foreign[arch]).get_vocab()
        assert json.loads((run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "What does `json.dumps` do?"}],
            max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 4
    finally:
        serve.shutdown()


@pytest.mark.ray
@pytest.mark.deepspeed
def test_sft_zero3_two_workers_non_llama(ray_cluster, foreign, tmp_path):
    """A model too big for one worker trains under ZeRO-3: the weights are partitioned over the workers and
    gathered for the export."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert raylm(["sft", "--model", str(foreign["gpt_neox"]), "-c", str(SMOKE), "--run-dir", str(run_dir),
                  "sft.zero_stage=3", "sft.num_workers=2", "sft.max_steps=2", "sft.warmup_steps=1", "sft.eval_every=2",
                  "sft.eval_batches=1", "sft.checkpoint_every=2", "sft.lr=1.0e-2"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    base = AutoModelForCausalLM.from_pretrained(foreign["gpt_neox"])
    assert type(trained).__name__ == "GPTNeoXForCausalLM"
    assert all(a.shape == b.shape for a, b in zip(trained.parameters(), base.parameters()))  # whole, not shards
    assert any((a - b).abs().max() > 0 for a, b in zip(trained.parameters(), base.parameters()))


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, foreign):
    """``--model org/name`` is a hub id that transformers resolves: from the Hugging Face cache when offline (how
    a cluster without internet uses a model fetched beforehand). Laid out here as ``huggingface_hub`` stores a
    download; run in a fresh interpreter because the hub reads its cache location at import."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--raylm-test--tiny-qwen3"
    shutil.copytree(foreign["qwen3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from pipelines.hf_models import check_base_model, load_causal_lm\n"
            "ref = check_base_model('raylm-test/tiny-qwen3', 'sft.base_model', 128, 'sft.max_len')\n"
            "print(ref, type(load_causal_lm(ref)).__name__)\n"
            "check_base_model('raylm-test/not-fetched', 'sft.base_model', 128, 'sft.max_len')\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.split() == ["raylm-test/tiny-qwen3", "Qwen3ForCausalLM"], done.stderr
    assert "ValueError: sft.base_model: raylm-test/not-fetched: transformers cannot read its config" in done.stderr
