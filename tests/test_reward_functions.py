"""Programmable rewards (``ppo.reward_functions``): spec parsing and loading errors, per-sample failures, and
``raylm ppo 'ppo.reward_functions=[my_rewards.py:brevity]'`` from the command line on the session cluster."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from actors.ppo.reward_functions import RewardFunction, evaluate, load_reward_functions
from cluster.schemas.rlhf import PPOConfig, RewardFunctionSpec

REWARDS = '''
def brevity(prompts, responses):
    return [-len(r.split()) for r in responses]


def picky(prompts, responses):
    if any("loads" in p for p in prompts):
        raise ValueError("I do not score loads")
    return [None if not r else 1.0 for r in responses]
'''


def test_spec_parsing_and_config_errors_name_the_entry():
    assert RewardFunctionSpec.parse("dir/my_rewards.py:brevity*0.5") == RewardFunctionSpec(
        source="dir/my_rewards.py", function="brevity", weight=0.5)
    assert RewardFunctionSpec.parse("pkg.mod:fn") == RewardFunctionSpec(source="pkg.mod", function="fn")
    with pytest.raises(ValueError, match=r"^reward_functions\[1\]: 'x.py:fn\*heavy': the weight"):
        PPOConfig(reward_functions=["a.py:f", "x.py:fn*heavy"])
    with pytest.raises(ValueError, match=r"^reward_functions\[0\]: 'brevity': expected path/to/file.py:function"):
        PPOConfig(reward_functions=["brevity"])
    with pytest.raises(ValueError, match="^use_reward_model"):
        PPOConfig(use_reward_model=False)


def test_loading_fails_naming_the_file_module_or_function(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    loaded = load_reward_functions(["my_rewards.py:brevity*0.5", "json:dumps"], cwd=tmp_path)
    assert [(f.name, f.weight) for f in loaded] == [("my_rewards:brevity", 0.5), ("json:dumps", 1.0)]
    with pytest.raises(ValueError, match="'missing.py:f': no such file .*missing.py"):
        load_reward_functions(["missing.py:f"], cwd=tmp_path)
    with pytest.raises(ValueError, match=r"'my_rewards.py:shortness': .* no function 'shortness' \(callables "
                                         r"there: brevity, picky\)"):
        load_reward_functions(["my_rewards.py:shortness"], cwd=tmp_path)
    with pytest.raises(ValueError, match="'broken.py:f': importing .*broken.py failed: ModuleNotFoundError"):
        load_reward_functions(["broken.py:f"], cwd=tmp_path)
    with pytest.raises(ValueError, match="'no_such_pkg.rewards:f': cannot import module"):
        load_reward_functions(["no_such_pkg.rewards:f"], cwd=tmp_path)


def test_a_failing_sample_scores_zero_and_is_named_the_rest_keep_their_values(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    picky = load_reward_functions(["my_rewards.py:picky"], cwd=tmp_path)[0]
    prompts = ["What does `json.dumps` do?", "What does `json.loads` do?", "What does `json.load` do?"]
    values, errors = evaluate(picky, prompts, ["Serialize obj.", "Parse s.", ""], indices=[4, 5, 6])
    assert values.tolist() == [1.0, 0.0, 0.0]  # sample 5 failed; sample 6 returned None ("no opinion")
    assert len(errors) == 1 and "picky: sample 5 (prompt 'What does `json.loads` do?'" in errors[0]
    assert "I do not score loads" in errors[0]
    with pytest.raises(RuntimeError, match="picky failed on all 1 samples"):
        evaluate(picky, prompts[1:2], ["x"])
    with pytest.raises(ValueError, match="returned 1 values for 2 samples"):
        evaluate(RewardFunction(name="short", fn=lambda p, r: [1.0], weight=1.0), ["a", "b"], ["c", "d"])
    nan = RewardFunction(name="nan", fn=lambda p, r: [float("nan"), 2], weight=1.0)
    values, errors = evaluate(nan, ["a", "b"], ["c", "d"])
    assert values.tolist() == [0.0, 2.0] and "not a finite number" in errors[0]


@pytest.mark.ray
@pytest.mark.deepspeed
def test_raylm_ppo_with_function_rewards_from_the_command_line(ray_cluster, tmp_path, monkeypatch):
    from alignment_fixtures import build_causal_lm

    from cluster.cli import main
    from cluster.rundir import RunDir, read_metrics

    run_dir = RunDir.create(tmp_path / "run")
    build_causal_lm(tmp_path / "lm")
    shutil.copytree(tmp_path / "lm", run_dir.model_dir("sft"))  # no reward model: the functions are the reward
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What does `json.{n}` do?"}) + "\n"
                               for n in ("dumps", "loads", "dump", "load")))
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)  # the file is named relative to the working directory, as a user would
    # PPO, so the critic starts from the policy's body (there is no reward model to start it from).
    args = ["ppo", "--run-dir", str(run_dir.root), "--data", str(prompts), "ppo.algorithm=ppo",
            "ppo.rollout_batch_size=8", "ppo.max_new_tokens=6", "ppo.micro_batch_size=8",
            "ppo.iterations=1", "ppo.use_reward_model=false",
            "ppo.reward_functions=[my_rewards.py:brevity*0.5, my_rewards.py:picky]"]
    assert main(args) == 0
    (step,) = [m for m in read_metrics(run_dir.stage("ppo")) if "reward_mean" in m]
    assert step["reward_fn_errors"] == 2  # 8 samples of 4 prompts: `json.loads` twice; the other six kept theirs
    assert step["reward/my_rewards:brevity"] <= 0 and 0 <= step["reward/my_rewards:picky"] <= 0.75
    want = 0.5 * step["reward/my_rewards:brevity"] + step["reward/my_rewards:picky"]
    assert step["reward_mean"] == pytest.approx(want, abs=1e-5)
    assert "reward_model" not in step
    assert main(args[:-1] + ["ppo.reward_functions=[my_rewards.py:shortness]"]) == 1  # fails, naming it


def test_builtin_arithmetic_task_and_its_rule_reward(tmp_path):
    from pipelines.tasks import arithmetic

    sums = [a + b for a, b in arithmetic.problems()]
    assert sorted(sums) == sorted(list(range(10)) * 10)  # every answer equally common: guessing scores 10%
    prompts = ["What is 3 + 4?", "What is 3 + 4?", "What is 0 + 0?", "What is 2 + 5?", "Name a colour."]
    responses = ["The answer is 7.", "The answer is 8, not 7.", "0", "seven", "red"]
    assert arithmetic.correct(prompts, responses) == [1.0, 0.0, 1.0, 0.0, None]
    out = arithmetic.write_task(tmp_path, copies=10)
    demos = [json.loads(line) for line in Path(out["sft"]).read_text().splitlines()]
    right = arithmetic.correct([d["prompt"] for d in demos], [d["response"] for d in demos])
    assert len(demos) == 1000 and 0.4 < sum(right) / len(right) < 0.6  # weak demonstrations, as asked
    assert len(Path(out["prompts"]).read_text().splitlines()) == 100
    (fn,) = load_reward_functions(["pipelines.tasks.arithmetic:correct"])
    assert evaluate(fn, prompts[:2], responses[:2])[0].tolist() == [1.0, 0.0]
