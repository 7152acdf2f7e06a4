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


def test_bad_recipe_fails_before_ray_starts(tmp_path):
    # A subprocess: the session's Ray cluster (if another test started it) must not mask a Ray start here.
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "pretrain", "--run-dir", str(tmp_path),
                          "pretrain.zero_stage=5"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "pretrain.zero_stage: must be 0, 1, 2 or 3, got 5" in out.stderr
    assert "Ray" not in out.stderr and "ray" not in out.stdout
    assert not (tmp_path / "config.yaml").exists()


def test_unbuilt_or_unknown_stage_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["run", "--stages", "data,bogus", "--run-dir", str(tmp_path)]) == 2
    assert "--stages: unknown stage 'bogus'" in capsys.readouterr().err
