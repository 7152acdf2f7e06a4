from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, apply_overrides, from_dict
from cluster.recipe import load_recipe, save_resolved
from cluster.schemas.train import PretrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny-cpu", "gpt-125m-gpu", "llama-1b-gpu"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(CONFIGS / f"{name}.yaml")
    assert recipe.name == name


def test_dotted_override_sets_nested_key():
    recipe = load_recipe(CONFIGS / "tiny-cpu.yaml", ["pretrain.zero_stage=3", "ppo.policy.replicas=2",
                                                     "data.input=[a.jsonl, b.jsonl]"])
    assert recipe.pretrain.zero_stage == 3
    assert recipe.ppo.policy.replicas == 2
    assert recipe.data.input == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("override, key", [
    ("pretrain.zero_stage=5", "pretrain.zero_stage"),
    ("pretrain.bogus=1", "pretrain.bogus"),
    ("model.dim=abc", "model.dim"),
    ("model.tie_embeddings=3", "model.tie_embeddings"),
    ("data.on_error=ignore", "data.on_error"),
    ("data.near_dedup.bands=7", "data.near_dedup.bands"),
    ("serve.autoscaling.min_replicas=5", "serve.autoscaling.min_replicas"),
    ("pretrain.pipeline_stages=2", "pretrain.pipeline_stages"),  # with zero_stage=2: DeepSpeed refuses
    ("ppo.policy.replicas=0", "ppo.policy.replicas"),
    ("pretrain.optimizer=sgd", "pretrain.optimizer"),
    ("pretrain.muon_lr=0", "pretrain.muon_lr"),
    ("model.mlp_act=gelu", "model.mlp_act"),
    ("model.logit_softcap=-1", "model.logit_softcap"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(CONFIGS / "tiny-cpu.yaml", [override])
    assert f"{key}:" in str(err.value)
    assert "tiny-cpu.yaml" in str(err.value)


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\x", ""])
def test_recipe_name_that_is_not_a_plain_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"tiny-cpu.yaml: name: must be a plain folder name"):
        load_recipe(CONFIGS / "tiny-cpu.yaml", [f"name={name!r}"])
    assert load_recipe(CONFIGS / "tiny-cpu.yaml", ["name=my.run-2"]).name == "my.run-2"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npretrain:\n  zero_stag: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: pretrain\.zero_stag: unknown key"):
        load_recipe(bad)


def test_int_is_accepted_for_float_but_not_str_for_int():
    cfg = from_dict(PretrainConfig, {"lr": 1})
    assert isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match="max_steps"):
        from_dict(PretrainConfig, {"max_steps": "10"})


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": 3}, ["model.dim=4"])


def test_resolved_config_round_trips(tmp_path):
    recipe = load_recipe(CONFIGS / "tiny-cpu.yaml", ["pretrain.max_steps=7", "pretrain.warmup_steps=2"])
    path = save_resolved(recipe, tmp_path)
    again = from_dict(type(recipe), yaml.safe_load(path.read_text()))
    assert again == recipe


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML alone (YAML 1.1) reads 1e-4 as a string; recipes and overrides take YAML 1.2 floats.
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: r\npretrain:\n  lr: 3e-3\n  min_lr: 3e-4\n")
    recipe = load_recipe(recipe_file, ["ppo.actor_lr=1e-4"])
    assert (recipe.pretrain.lr, recipe.pretrain.min_lr, recipe.ppo.actor_lr) == (3e-3, 3e-4, 1e-4)


def test_every_bad_key_is_named_at_once_with_the_value_given():
    with pytest.raises(ConfigError) as err:
        load_recipe(CONFIGS / "tiny-cpu.yaml", ["model.dim=abc", "data.input=[a.txt, 3]", "pretrain.stop_at_step=x",
                                                "pretrain=3"])
    message = str(err.value)
    assert "model.dim: expected a valid integer, got 'abc'" in message
    assert "data.input[1]: expected a valid string, got 3" in message
    assert "pretrain: expected a mapping, got 3" in message


def test_strict_where_yaml_would_guess(tmp_path):
    # No "10" -> 10, true -> 1 or 2026-01-01 -> anything: only int -> float is accepted.
    for override, key in [("model.dim=true", "model.dim"), ("seed=2026-01-01", "seed"), ("ppo.prompts=3", "ppo.prompts")]:
        with pytest.raises(ConfigError, match=rf"{key}: expected a valid"):
            load_recipe(CONFIGS / "tiny-cpu.yaml", [override])
