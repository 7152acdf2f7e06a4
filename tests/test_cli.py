import subprocess
import sys

from cluster.cli import STAGE_ENTRYPOINTS, build_parser, main

COMMANDS = ["run", "data", "pretrain", "sft", "reward", "ppo", "serve", "submit"]


def test_help_lists_the_eight_commands():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert f"    {command} " in out.stdout


def test_every_stage_command_takes_config_run_dir_and_overrides():
    parser = build_parser()
    for stage in STAGE_ENTRYPOINTS:
        args = parser.parse_args([stage, "-c", "x.yaml", "--run-dir", "/tmp/r", "a.b=1"])
        assert (args.config, args.run_dir, args.overrides) == ("x.yaml", "/tmp/r", ["a.b=1"])


def test_bad_recipe_fails_before_ray_starts(tmp_path, capsys):
    import ray

    rc = main(["pretrain", "--run-dir", str(tmp_path), "pretrain.zero_stage=5"])
    assert rc == 2
    assert "pretrain.zero_stage" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "config.yaml").exists()
