"""PPO: rollout helpers (fast), and the four roles as Ray actors on the session cluster (tiny HF models)."""
from __future__ import annotations

import pytest
import torch

from actors.ppo.driver import PromptSampler
from actors.ppo.rollout import concat_batches, pad_left, response_mask, split_batch
from cluster.schemas.rlhf import PPOConfig, RoleConfig


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5]])
    assert response_mask(responses, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_pad_left_and_concat_pad_right():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    a = {"sequences": torch.ones(1, 4, dtype=torch.long), "response_mask": torch.ones(1, 2), "scores": torch.ones(1)}
    b = {"sequences": torch.ones(2, 3, dtype=torch.long), "response_mask": torch.ones(2, 1), "scores": torch.zeros(2)}
    out = concat_batches([a, b], pad_id=9)
    assert out["sequences"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 9], [1, 1, 1, 9]]
    assert out["response_mask"].tolist() == [[1, 1], [1, 0], [1, 0]] and out["scores"].tolist() == [1, 0, 0]
    shards = split_batch(out, 2)
    assert [s["scores"].tolist() for s in shards] == [[1.0], [0.0, 0.0]]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_response_logprobs_keep_only_the_response_logits(arch):
    """``logits_to_keep`` (the LM head over the response positions only) gives the full forward's values."""
    import transformers

    from actors.algos import logprobs_from_logits
    from actors.ppo.rollout import response_logprobs
    from pipelines.reward.model import position_ids

    name = {"llama": "Llama", "qwen3": "Qwen3", "gpt_neox": "GPTNeoX"}[arch]
    config = getattr(transformers, f"{name}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    **({"head_dim": 16, "num_key_value_heads": 1} if arch == "qwen3" else {}))
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    seq = torch.randint(1, 64, (3, 9))
    mask = torch.ones_like(seq)
    mask[1, :2] = 0  # a left-padded prompt
    batch = {"sequences": seq, "attention_mask": mask, "response_mask": torch.ones(3, 4, dtype=torch.long)}
    with torch.no_grad():
        got, _ = response_logprobs(model, batch)
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
    assert torch.allclose(got, logprobs_from_logits(logits[:, -5:-1], seq[:, -4:]), atol=1e-5)


def test_prompt_sampler_is_deterministic_and_resumable():
    prompts = [[i] for i in range(5)]
    a = PromptSampler(prompts, seed=3)
    first = a.take(7)
    assert sorted(x[0] for x in first[:5]) == list(range(5))  # one epoch covers every prompt once
    b = PromptSampler(prompts, seed=3)
    b.restore(a.state())
    c = PromptSampler(prompts, seed=3)
    c.take(7)
    assert b.take(6) == c.take(6)


def test_ppo_config_validation_names_the_key():
    with pytest.raises(ValueError, match="^group_size"):
        PPOConfig(algorithm="grpo", rollout_batch_size=6, group_size=4)
    with pytest.raises(ValueError, match="^zero_stage"):
        PPOConfig(zero_stage=3)
    with pytest.raises(ValueError, match=r"^policy\.replicas"):
        PPOConfig(rollout_batch_size=5, policy=RoleConfig(replicas=2))
    with pytest.raises(ValueError, match="^async_rollout: needs rollout_engine: hf_engine"):
        PPOConfig(async_rollout=True)
    with pytest.raises(ValueError, match="^mini_batch_size: must divide"):
        PPOConfig(rollout_batch_size=16, mini_batch_size=12)
    with pytest.raises(ValueError, match=r"^mini_batch_size: must be a multiple of micro_batch_size x policy"):
        PPOConfig(rollout_batch_size=16, micro_batch_size=4, mini_batch_size=8, policy=RoleConfig(replicas=4))
    cfg = PPOConfig(algorithm="grpo", rollout_batch_size=16, micro_batch_size=4, mini_batch_size=16,
                    policy=RoleConfig(replicas=2), kl_mode="loss")
    assert cfg.grad_accum("policy") == 2 and cfg.single_update
    assert not PPOConfig(rollout_batch_size=16, mini_batch_size=16, kl_mode="reward").single_update


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from alignment_fixtures import build_causal_lm, build_reward_model

    root = tmp_path_factory.mktemp("ppo-models")
    lm = build_causal_lm(root / "sft")
    return lm, build_reward_model(lm, root / "reward")


def chat_prompts(model_dir, names):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, [tok.apply_chat_template([{"role": "user", "content": f"What does `json.{n}` do?"}],
                                         add_generation_prompt=True, return_dict=True)["input_ids"] for n in names]


@pytest.mark.ray
@pytest.mark.deepspeed
def test_four_roles_two_iterations(ray_cluster, tiny_models):
    from actors.ppo.driver import PPOTrainer

    lm, rm = tiny_models
    tok, prompts = chat_prompts(lm, ["dumps", "loads", "dump", "load"])
    # Two policy replicas: a real data-parallel group (gloo) whose gradients DeepSpeed averages.
    cfg = PPOConfig(iterations=2, rollout_batch_size=4, max_new_tokens=8, micro_batch_size=2, actor_lr=1e-3,
                    critic_lr=1e-3, kl_estimator="k3", policy=RoleConfig(replicas=2))
    trainer = PPOTrainer(cfg, str(lm), str(rm), pad_id=tok.pad_token_id)
    try:
        before = trainer.checksums()
        assert before["policy"] == before["reference"] * 2  # both start from the SFT model
        first, second = trainer.step(prompts), trainer.step(prompts)
        after = trainer.checksums()
    finally:
        trainer.shutdown()
    assert after["policy"][0] != before["policy"][0]
    assert after["policy"][0] == pytest.approx(after["policy"][1], rel=1e-6)  # replicas stay in sync
    assert after["critic"] != before["critic"]
    assert after["reference"] == before["reference"] and after["reward"] == before["reward"]
    # KL is measured against the reference: exactly 0 before the first update, > 0 after it (k3 >= 0).
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert second["kl"] > 1e-6
    for key in ("reward_mean", "reward_std", "entropy", "clip_frac", "value_loss", "response_len", "samples_per_s",
                "time_generate", "time_score", "time_train", "time_sync", "truncated_frac", "score_mean"):
        assert key in second
    # The adaptive KL controller is on by default: both iterations report the target and the coefficient used.
    assert first["kl_target"] == second["kl_target"] == cfg.kl_target and first["kl_coef"] == cfg.kl_coef
    assert second["kl_coef"] < first["kl_coef"]  # KL 0 < target after iteration 1: the coefficient shrank


@pytest.mark.ray
@pytest.mark.deepspeed
def test_single_update_skips_the_rollout_logprob_forward_and_changes_nothing(ray_cluster, tiny_models, tmp_path):
    """One update per batch (mini_batch_size = rollout_batch_size, kl in the loss): the old log-probs are the
    update's own; the same seeded run with them computed by the rollout forward ends at the same weights."""
    from actors.group import gather
    from actors.ppo.driver import PPOTrainer
    from actors.ppo.reward_functions import load_reward_functions

    lm, _ = tiny_models
    tok, prompts = chat_prompts(lm, ["dumps", "loads"])
    prompts = [p for p in prompts for _ in range(2)]  # 2 prompts x group 2
    # 2 replicas x micro-batch 1: each replica accumulates 2 micro-batches into the one step of the batch.
    cfg = PPOConfig(algorithm="grpo", iterations=1, rollout_batch_size=4, group_size=2, max_new_tokens=6,
                    micro_batch_size=1, mini_batch_size=4, actor_lr=1e-3, kl_mode="loss", kl_estimator="k3",
                    kl_coef=0.5, adaptive_kl=False, use_reward_model=False, reward_functions=["rewards.py:length"],
                    policy=RoleConfig(replicas=2))
    (tmp_path / "rewards.py").write_text("def length(prompts, responses):\n"
                                         "    return [len(r) / 10 for r in responses]\n")
    functions = load_reward_functions(["rewards.py:length"], cwd=tmp_path)  # scores that differ in a group
    results = []
    for recompute in (False, True):
        trainer = PPOTrainer(cfg, str(lm), None, pad_id=tok.pad_token_id, reward_functions=functions)
        try:
            if recompute:  # what the driver does without single_update, by hand
                batch = trainer._generate(prompts)
                assert "logprobs" not in batch
                batch["logprobs"] = gather(trainer.policy.scatter("rollout_logprobs", batch), trainer.pad_id)
                batch.update(trainer._score(batch))
                stats = trainer._advantages(batch)
                stats.update(trainer._train(batch))
            else:
                stats = trainer.step(prompts)
            results.append((stats, trainer.checksums()["policy"]))
        finally:
            trainer.shutdown()
    (skipped, weights), (recomputed, weights_recomputed) = results
    assert weights[0] == pytest.approx(weights_recomputed[0], rel=1e-6)
    assert weights[0] == pytest.approx(weights[1], rel=1e-6)  # replicas in sync after the accumulated step
    assert skipped["approx_kl"] == 0 and skipped["clip_frac"] == 0  # ratio 1: old = this update's own
    assert skipped["kl"] == pytest.approx(recomputed["kl"], abs=1e-6)  # measured by the update's forward
    assert skipped["kl_per_token"] == pytest.approx(recomputed["kl_per_token"], abs=1e-6)


@pytest.mark.ray
@pytest.mark.deepspeed
def test_rollout_engine_samples_as_the_policy_and_async_is_one_step_off(ray_cluster, tiny_models, tmp_path):
    """hf_engine without overlap trains exactly as the policy sampling itself (same seeds, same samples, same
    weights); with async_rollout the first batch is the same and the second was sampled by the weights before
    the first update (the PPO ratio against them is no longer 1)."""
    from actors.ppo.driver import PPOTrainer
    from actors.ppo.reward_functions import load_reward_functions

    lm, _ = tiny_models
    tok, prompts = chat_prompts(lm, ["dumps", "loads", "dump", "load"])
    first, second = ([p for p in prompts[i:i + 2] for _ in range(2)] for i in (0, 2))  # 2 prompts x group 2
    (tmp_path / "rewards.py").write_text("def length(prompts, responses):\n"
                                         "    return [len(r) / 10 for r in responses]\n")
    functions = load_reward_functions(["rewards.py:length"], cwd=tmp_path)
    config = lambda **engine: PPOConfig(
        algorithm="grpo", iterations=2, rollout_batch_size=4, group_size=2, max_new_tokens=6, micro_batch_size=2,
        mini_batch_size=4, actor_lr=1e-2, kl_mode="loss", kl_estimator="k3", use_reward_model=False,
        reward_functions=["rewards.py:length"], **engine)
    runs = {}
    for name, engine in (("policy", {}), ("engine", {"rollout_engine": "hf_engine"}),
                         ("async", {"rollout_engine": "hf_engine", "async_rollout": True})):
        trainer = PPOTrainer(config(**engine), str(lm), None, pad_id=tok.pad_token_id,
                             reward_functions=functions)
        try:
            steps = [trainer.step(first, second), trainer.step(second)]
            runs[name] = steps, trainer.checksums()["policy"][0]
        finally:
            trainer.shutdown()
    (policy_steps, policy_weights), (engine_steps, engine_weights) = runs["policy"], runs["engine"]
    for a, b in zip(policy_steps, engine_steps):
        assert a["reward_mean"] == b["reward_mean"] and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    assert engine_weights == pytest.approx(policy_weights, rel=1e-6)
    async_steps, _ = runs["async"]
    assert async_steps[0]["reward_mean"] == engine_steps[0]["reward_mean"]
    assert async_steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-9)  # sampled by the weights it updates
    assert async_steps[1]["approx_kl"] > 1e-6 and engine_steps[1]["approx_kl"] == 0  # one update behind


@pytest.mark.ray
@pytest.mark.deepspeed
def test_grpo_stage_checkpoints_resumes_and_exports(ray_cluster, tiny_models, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from actors.ppo.stage import run
    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir, read_metrics
    from cluster.stage import StageContext

    lm, rm = tiny_models
    run_dir = RunDir.create(tmp_path / "run")
    shutil.copytree(lm, run_dir.model_dir("sft"))
    shutil.copytree(rm, run_dir.model_dir("reward"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What does `json.{n}` do?"}) + "\n"
                               for n in ("dumps", "loads", "dump", "load")))
    # async_rollout: each batch is sampled (by an hf_engine) while the previous one trains, one update behind.
    base = ["ppo.algorithm=grpo", "ppo.rollout_batch_size=4", "ppo.group_size=2", "ppo.max_new_tokens=6",
            "ppo.micro_batch_size=4", "ppo.checkpoint_every=1", f"ppo.prompts={prompts}", "ppo.actor_lr=1.0e-3",
            "ppo.kl_mode=loss", "ppo.kl_estimator=k3", "ppo.rollout_engine=hf_engine", "ppo.async_rollout=true"]
    first = run(StageContext(recipe=load_recipe(overrides=base + ["ppo.iterations=2"]), run_dir=run_dir))
    assert first["resumed_from"] == 0 and first["algorithm"] == "grpo"
    after_first = AutoModelForCausalLM.from_pretrained(run_dir.model_dir("ppo")).state_dict()
    # Resume from the checkpoint taken mid-run, after iteration 1, while batch 2 was being sampled.
    checkpoints = run_dir.stage("ppo") / "checkpoints"
    (checkpoints / "latest.json").write_text(json.dumps({"tag": "iter_000001"}))
    second = run(StageContext(recipe=load_recipe(overrides=base + ["ppo.iterations=3"]), run_dir=run_dir))
    assert second["resumed_from"] == 1
    steps = [m for m in read_metrics(run_dir.stage("ppo")) if "reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 2, 3]
    # Batch 2 again (the sampler resumed at its prompts), sampled by the restored weights (ratio 1), then the
    # run continues one update behind: batch 3 was sampled while update 2 ran, by the weights before it.
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-9) and steps[1]["approx_kl"] > 1e-9
    assert steps[2]["approx_kl"] == pytest.approx(0.0, abs=1e-9) and steps[3]["approx_kl"] > 1e-9
    assert json.loads((checkpoints / "latest.json").read_text())["tag"] == "iter_000003"
    after_resume = AutoModelForCausalLM.from_pretrained(run_dir.model_dir("ppo")).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(run_dir.model_dir("sft")).state_dict()
    changed = lambda a, b: any((a[k] - b[k]).abs().max() > 0 for k in a)
    assert changed(after_first, sft) and changed(after_resume, after_first)
    from huggingface_hub import ModelCard  # the export's model card, written by the policy actor

    card = ModelCard.load(run_dir.model_dir("ppo") / "README.md").data.to_dict()
    assert card["training_stages"] == ["pretrain", "sft", "ppo"] and card["datasets"] == [str(prompts)]


def test_vllm_engine_without_vllm_fails_with_a_clear_message():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    from actors.ppo.vllm_engine import require_vllm

    with pytest.raises(RuntimeError, match="ppo.rollout_engine: 'vllm' needs the vllm package"):
        require_vllm()


@pytest.mark.ray
def test_vllm_engines_are_planned_in_a_placement_group_like_every_role(ray_cluster):
    from ray.util.placement_group import remove_placement_group

    from actors.group import plan_placement

    cfg = PPOConfig(rollout_engine="vllm", vllm_engines=2, vllm_tensor_parallel=2)
    plan = plan_placement(cfg, ("policy", "reference", "reward", "critic", "vllm"))
    try:  # one bundle of tensor-parallel GPUs per engine; the engine actor takes all of it
        assert plan["vllm"].pg.bundle_specs == [{"CPU": 1, "GPU": 2}] * 2
        assert plan["vllm"].bundle_indices == [0, 1] and plan["vllm"].num_gpus == 2
        assert plan["vllm"].pg is not plan["policy"].pg
    finally:
        for pg in {id(p.pg): p.pg for p in plan.values()}.values():
            remove_placement_group(pg)
