"""`raylm submit` (and `ray job` on what it submitted) against a real `ray start --head` cluster (token auth on), plus the pure helpers.

The cluster here is our own (2 CPUs, loopback, its own ports and temp dir), not the session `ray_cluster`:
the Jobs API needs a dashboard, and we must stop exactly what we started (never `ray stop`: other clusters
run on this machine).
"""
from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from polling import wait_for

from cluster.config import ConfigError
from cluster.jobs import (
    JobsError,
    auth_headers,
    build_entrypoint,
    check_command,
    dashboard_address,
    exposed_secrets,
    parse_env,
    plain_http_warning,
    portable_args,
    portable_reward_functions,
    prepare_command,
    runtime_env,
)
from cluster.recipe import PROJECT_ROOT
from cluster.upload import UploadError, plan_upload

RAY = Path(sys.executable).with_name("ray")
DATA_STAGE = PROJECT_ROOT / "pipelines" / "data" / "stage.py"


# ---------------------------------------------------------------- pure helpers

def test_dashboard_address_defaults_and_normalises():
    assert dashboard_address(None, env={}) == "http://127.0.0.1:8265"
    assert dashboard_address(None, env={"RAY_ADDRESS": "10.0.0.5:8265/"}) == "http://10.0.0.5:8265"
    assert dashboard_address("https://head:443", env={"RAY_ADDRESS": "x"}) == "https://head:443"
    with pytest.raises(JobsError, match="dashboard"):
        dashboard_address("ray://head:10001", env={})


def test_auth_headers_find_the_token(tmp_path):
    assert auth_headers(env={}, home=tmp_path) == {}
    assert auth_headers(env={"RAY_AUTH_TOKEN": "abc"}, home=tmp_path) == {"Authorization": "Bearer abc"}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromfile\n")
    assert auth_headers(env={}, home=tmp_path) == {"Authorization": "Bearer fromfile"}
    assert auth_headers(env={"RAY_AUTH_MODE": "disabled"}, home=tmp_path) == {}
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN"):
        auth_headers(env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})


def test_paths_become_portable(tmp_path):
    root = tmp_path / "proj"
    (root / "configs").mkdir(parents=True)
    args = ["data", "-c", "configs/x.yaml", "--run-dir", "runs/a", "--input=../corpus", "--input", "s3://b/c",
            "data.num_blocks=2"]
    out = portable_args(args, cwd=root, project_root=root, shipped={"configs/x.yaml", "pipelines/a.py"})
    # shipped with the working_dir: stays relative; runs/ is not shipped and outside paths: absolute
    assert out == ["data", "-c", "configs/x.yaml", "--run-dir", str(root / "runs/a"),
                   f"--input={tmp_path / 'corpus'}", "--input", "s3://b/c", "data.num_blocks=2"]
    (root / "models" / "mine").mkdir(parents=True)
    out = portable_args(["sft", "--model", "Qwen/Qwen3-0.6B"], cwd=root, project_root=root, shipped=set())
    assert out == ["sft", "--model", "Qwen/Qwen3-0.6B"]  # a hub id, resolved by transformers on the cluster
    out = portable_args(["sft", "--model=models/mine"], cwd=root, project_root=root, shipped=set())
    assert out == ["sft", f"--model={root / 'models' / 'mine'}"]  # a local dir of that shape stays a path


def test_reward_function_files_travel_with_the_job_or_are_refused(tmp_path):
    root = tmp_path / "proj"
    (root / "rewards").mkdir(parents=True)
    (root / "configs").mkdir()
    for name in ("mine.py", "ignored.py"):
        (root / "rewards" / name).write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    (tmp_path / "outside.py").write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    shipped, cwd = {"rewards/mine.py"}, root / "configs"
    mine = "ppo.reward_functions=[../rewards/mine.py:f*0.5, pkg.mod:g]"
    # named from a subdirectory: relative to the project (the job's cwd), replacing the user's override in place
    out = portable_reward_functions(["ppo", "a.b=1", mine, "--data", "d"], ["a.b=1", mine],
                                    ["../rewards/mine.py:f*0.5", "pkg.mod:g"], cwd, root, shipped)
    assert out == ["ppo", "a.b=1", 'ppo.reward_functions=["rewards/mine.py:f*0.5", "pkg.mod:g"]', "--data", "d"]
    # named in the recipe file: the rewritten list follows the last override (overrides stay contiguous)
    out = portable_reward_functions(["ppo", "a.b=1", "--data", "d"], ["a.b=1"], ["../rewards/mine.py:f"], cwd, root,
                                    shipped)
    assert out == ["ppo", "a.b=1", 'ppo.reward_functions=["rewards/mine.py:f"]', "--data", "d"]
    assert portable_reward_functions(["ppo"], [], ["rewards/mine.py:f"], root, root, shipped) == ["ppo"]
    for entry, why in (("../../outside.py:f", "outside the checkout"), ("../rewards/ignored.py:f", "git-ignored"),
                       ("../rewards/none.py:f", "no such file")):
        with pytest.raises(JobsError, match=rf"reward_functions\[1\]: '{re.escape(entry)}': .*{why}"):
            portable_reward_functions(["ppo"], [], ["pkg.mod:g", entry], cwd, root, shipped)
    # the image holds the project (--no-working-dir): a file outside it must be at the same absolute path there
    assert portable_reward_functions(["ppo"], [], ["../../outside.py:f"], cwd, root, None) == [
        "ppo", f'ppo.reward_functions=["{tmp_path / "outside.py"}:f"]']


def test_command_is_checked_before_submitting(tmp_path):
    with pytest.raises(JobsError, match="cannot run as a job"):
        check_command(["submit", "--", "data"])
    with pytest.raises(JobsError, match="not a valid raylm command"):
        check_command(["rm", "-rf", "/"])
    with pytest.raises(ConfigError, match="pretrain.zero_stage"):
        prepare_command(["pretrain", "pretrain.zero_stage=7"], cwd=tmp_path)
    # the default run dir is pinned to where it would be locally (the job's cwd is a temporary copy)
    assert prepare_command(["raylm", "data"], cwd=tmp_path)[:3] == ["data", "--run-dir",
                                                                     str(tmp_path / "runs" / "tiny-cpu")]
    # report's positional RUN_DIR is the run dir (not pinned a second time); eval's --text and --tokenizer are paths
    assert prepare_command(["report", "runs/a"], cwd=tmp_path) == ["report", str(tmp_path / "runs" / "a")]
    out = prepare_command(["eval", "--run-dir", "r", "--endpoint", "http://h:8000/v1", "--text", "held.txt",
                           "--tokenizer=tok", "--model", "raylm"], cwd=tmp_path)
    assert out == ["eval", "--run-dir", str(tmp_path / "r"), "--endpoint", "http://h:8000/v1", "--text",
                   str(tmp_path / "held.txt"), f"--tokenizer={tmp_path / 'tok'}", "--model", str(tmp_path / "raylm")]
    assert build_entrypoint("/v/python", ["data", "--input", "a b"]) == "/v/python -m cluster.cli data --input 'a b'"


def test_job_runtime_env_ships_the_project_without_clashing_env_vars():
    env = runtime_env({"HF_HOME": "/mnt/hf"}, ["rich"], working_dir="/tmp/p.zip")
    assert env == {"working_dir": "/tmp/p.zip", "env_vars": {"HF_HOME": "/mnt/hf"}, "pip": ["rich"]}
    # the job's driver (init_ray) sets these for its workers; Ray refuses the same key twice
    with pytest.raises(JobsError, match="--env TOKENIZERS_PARALLELISM"):
        runtime_env({"TOKENIZERS_PARALLELISM": "true"}, [], working_dir=None)
    assert "working_dir" not in runtime_env({}, [], working_dir=None)


def test_env_from_files_this_machine_and_cluster_references(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("# comment\nexport HF_HOME=/mnt/hf\nWANDB_API_KEY='s3cr$t'\nMODE=a\n")
    env = parse_env(["MODE=b", "LOCAL_ONLY"], [str(env_file)], ["HF_TOKEN", "DB_PASSWORD=PG_PASS"],
                    local={"LOCAL_ONLY": "here"})
    assert env == {"HF_HOME": "/mnt/hf", "WANDB_API_KEY": "s3cr$t", "MODE": "b", "LOCAL_ONLY": "here",
                   "HF_TOKEN": "${HF_TOKEN}", "DB_PASSWORD": "${PG_PASS}"}
    assert exposed_secrets(env) == ["WANDB_API_KEY"]  # references hold no secret
    with pytest.raises(JobsError, match="--env NOT_SET: not set on this machine"):
        parse_env(["NOT_SET"], local={})
    with pytest.raises(JobsError, match="--env-file .*missing.env: no such file"):
        parse_env([], [str(tmp_path / "missing.env")])
    with pytest.raises(JobsError, match="--cluster-env 'A-B'"):
        parse_env([], [], ["A-B"])


def test_token_over_plain_http_to_another_host_warns():
    assert plain_http_warning("http://127.0.0.1:8265") is None
    assert plain_http_warning("http://localhost:8265") is None
    assert plain_http_warning("https://head.example:443") is None
    assert "plain http" in plain_http_warning("http://10.0.0.5:8265")


def _checkout_with_secrets(root: Path) -> Path:
    """A git checkout of raylm's cluster/ and configs/ holding secrets and ignored files beside the code."""
    for part in ("cluster", "configs"):
        shutil.copytree(PROJECT_ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("runs/\n*.log\n")
    (root / ".env").write_text("HF_TOKEN=hf_leak\n")
    (root / "configs" / ".env.prod").write_text("DB_PASSWORD=leak\n")
    (root / "deploy.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (root / ".aws").mkdir()
    (root / ".aws" / "config").write_text("[default]\n")
    (root / "runs" / "x").mkdir(parents=True)
    (root / "runs" / "x" / "model.bin").write_bytes(b"0" * 1000)
    (root / "train.log").write_text("ignored\n")
    (root / "scratch.txt").write_text("in .git/info/exclude\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".git" / "info" / "exclude").write_text("scratch.txt\n")
    # even a tracked secret stays here
    subprocess.run(["git", "-C", str(root), "add", "-f", "cluster", ".env", ".gitignore"], check=True)
    return root


def test_submit_dry_run_lists_the_upload_without_secrets_or_ignored_files(tmp_path):
    root = _checkout_with_secrets(tmp_path / "proj")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--dry-run", "--address", "http://10.9.9.9:1",
                          "--", "k8s", "render", "-c", "configs/tiny-cpu.yaml", "--out", "rendered.yaml"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    listed = {line.split()[-1] for line in res.stdout.splitlines() if line.strip().endswith((".py", ".yaml"))}
    assert "cluster/cli.py" in listed and "configs/tiny-cpu.yaml" in listed  # tracked and untracked code
    uploaded = [line.split()[-1] for line in res.stdout.splitlines() if "B  " in line]
    for leak in (".env", "configs/.env.prod", "deploy.key", ".aws/config", "runs/x/model.bin", "train.log",
                 "scratch.txt"):
        assert leak not in uploaded, leak
    for withheld in (".env", "configs/.env.prod", "deploy.key", ".aws/config"):
        assert f"withheld  {withheld}  (" in res.stdout
    assert "hf_leak" not in res.stdout + res.stderr
    assert "entrypoint: python -m cluster.cli k8s render -c configs/tiny-cpu.yaml --out " in res.stdout
    assert "plain http" in res.stderr  # a non-loopback http address, though nothing was contacted
    # the zip holds exactly the listed files
    plan = plan_upload(root)
    with zipfile.ZipFile(plan.write_zip(tmp_path / "p.zip")) as zf:
        assert sorted(zf.namelist()) == sorted(uploaded) == [rel for rel, _ in plan.files]


def test_submit_dry_run_carries_a_reward_function_file(tmp_path):
    root = _checkout_with_secrets(tmp_path / "proj")
    (root / "rewards").mkdir()
    (root / "rewards" / "brevity.py").write_text("def brevity(prompts, responses):\n    return [0.0] * len(responses)\n")
    (tmp_path / "elsewhere.py").write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    submit = [sys.executable, "-m", "cluster.cli", "submit", "--dry-run", "--", "ppo", "ppo.use_reward_model=false"]
    run = lambda entry: subprocess.run([*submit, f"ppo.reward_functions=[{entry}]"], cwd=root / "configs", env={
        **env, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120, check=False)
    res = run("../rewards/brevity.py:brevity*0.5")  # named from a subdirectory of the checkout
    assert res.returncode == 0, res.stderr
    assert " rewards/brevity.py" in res.stdout  # in the upload listing
    assert """'ppo.reward_functions=["rewards/brevity.py:brevity*0.5"]'""" in res.stdout  # the job's cwd: the project
    res = run("../../elsewhere.py:f")
    assert res.returncode == 1
    assert "ppo.reward_functions[0]" in res.stderr and "outside the checkout" in res.stderr
    assert "entrypoint" not in res.stdout


def test_upload_over_the_limit_names_the_biggest_files(tmp_path):
    root = _checkout_with_secrets(tmp_path / "proj")
    (root / "corpus.jsonl").write_bytes(b"x" * 300_000)  # untracked, not ignored: would be shipped
    with pytest.raises(UploadError, match=r"over the 0.1 MiB limit; biggest: corpus.jsonl \(293.0 KiB\)"):
        plan_upload(root).check_limit(0.1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UploadError, match="not a usable git checkout"):
        plan_upload(tmp_path / "plain")


def test_unreachable_dashboard_is_a_clear_error(capsys):
    from cluster.cli import main

    port = _free_ports(1)[0]
    rc = main(["submit", "--no-working-dir", "--address", f"http://127.0.0.1:{port}", "--", "lineage", "x"])
    assert rc == 1
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------- a real head node

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_dashboard(address: str, token: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            r = requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"dashboard {address} not up after {timeout_s}s")


def _pids_using(temp_dir: str) -> list[int]:
    """Processes of the cluster we started: their command lines name its temp dir or session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "RAYLM_TEST_NODE_SECRET": "node-only-value",  # as a Kubernetes Secret in the pods' env would be
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # else --node-ip-address 127.0.0.1 becomes the network address
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env), "--object-store-memory", str(300 * 1024 * 1024),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(Path(temp_dir) / "ray-start.log", "w") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_dashboard(address, token, proc)
        yield {"address": address, "token": token, "temp_dir": temp_dir, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start shuts its node down on SIGTERM
        try:
            proc.wait(timeout=15)  # then whatever is left of our node is killed by pid below
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in _pids_using(temp_dir):  # anything left of OUR cluster only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _raylm(args: list[str], token: str | None, cwd: Path = PROJECT_ROOT, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
def test_submitted_command_succeeds_and_writes_its_output(head, tmp_path):
    out = tmp_path / "rendered" / "rayservice.yaml"
    res = _raylm(["submit", "--address", head["address"], "--", "raylm", "k8s", "render",
                  "-c", "configs/tiny-cpu.yaml", "--out", str(out), "serve.autoscaling.max_replicas=3"],
                 head["token"])
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.splitlines()[0]
    assert job_id.startswith("raylm-k8s-")
    assert f"job {job_id} SUCCEEDED" in res.stderr
    assert "wrote " in res.stdout  # the job's own output, followed live
    service = yaml.safe_load(out.read_text())
    assert "max_replicas: 3" in service["spec"]["serveConfigV2"]
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    # the checkout went as our zip (cluster/upload.py), content-addressed by Ray
    assert client.get_job_info(job_id).runtime_env["working_dir"].startswith("gcs://_ray_pkg_")

    # the rest is Ray's own CLI, as docs/operations.md shows it (token auth: RAY_AUTH_MODE=token + the token)
    ray_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head["token"]}
    ray_cli = str(Path(sys.executable).parent / "ray")
    for action, expected in (("status", f"job '{job_id}' succeeded"), ("logs", "wrote ")):
        res = subprocess.run([ray_cli, "job", action, job_id, "--address", head["address"]], env=ray_env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0 and expected.lower() in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


@pytest.mark.ray
def test_cluster_env_reference_resolves_on_the_node_and_only_the_reference_is_stored(head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    env = runtime_env(parse_env([], [], ["MY_SECRET=RAYLM_TEST_NODE_SECRET"]), [], working_dir=None)
    job_id = client.submit_job(entrypoint=f"{sys.executable} -c \"import os; print('got', os.environ['MY_SECRET'])\"",
                               runtime_env=env)
    wait_for(lambda: str(client.get_job_status(job_id)) in ("SUCCEEDED", "FAILED"), 120, "the job to end")
    assert "got node-only-value" in client.get_job_logs(job_id)
    assert client.get_job_info(job_id).runtime_env["env_vars"] == {"MY_SECRET": "${RAYLM_TEST_NODE_SECRET}"}


@pytest.mark.ray
def test_driver_joining_a_cluster_ships_the_same_zip(head):
    """`raylm <stage> --address HEAD:6379` from outside a job: init_ray uploads the checkout as cluster/upload
    lists it (a subprocess: this process may hold the session cluster)."""
    code = (f"import ray; from cluster.runtime import init_ray; init_ray(address={head['gcs']!r}); "
            "print('WD', ray.get_runtime_context().runtime_env['working_dir']); "
            "print('CWD', ray.get(ray.remote(lambda: __import__('os').getcwd()).remote()))")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head["token"],
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the head is on loopback: so must the driver's node be
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "WD gcs://_ray_pkg_" in res.stdout
    cwd = Path(res.stdout.split("CWD ")[1].strip())
    assert (cwd / "cluster" / "upload.py").is_file()  # the task runs in the unpacked zip
    assert not (cwd / ".git").exists() and not (cwd / "runs").exists()


@pytest.mark.ray
def test_failing_job_is_reported_failed_with_its_error(head, tmp_path):
    missing = tmp_path / "gone.yaml"  # exists nowhere: the job's own recipe check fails on the cluster
    res = _raylm(["submit", "--address", head["address"], "--", "k8s", "render", "-c", str(missing)],
                 head["token"])
    assert res.returncode == 1
    assert "FAILED" in res.stderr
    assert f"{missing}: recipe file not found" in res.stderr  # the job's error, in the final report


@pytest.mark.ray
def test_missing_token_is_a_clear_auth_error(head, tmp_path, monkeypatch, capsys):
    from cluster.cli import main
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    rc = main(["submit", "--address", head["address"], "--", "k8s", "render", "-c", "configs/tiny-cpu.yaml"])
    assert rc == 1
    err = capsys.readouterr().err
    assert head["address"] in err and "token" in err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not DATA_STAGE.exists(), reason="the data stage (pipelines/data/stage.py) has not landed yet")
def test_data_stage_runs_as_a_job(head, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    vocab = ["ray", "data", "stream", "text", "clean", "filter", "dedup", "token", "pack", "shard", "model",
             "train", "serve", "chat", "actor", "cluster", "node", "task", "block", "batch"]
    for i in range(60):  # distinct documents, long enough for the quality filter
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(120)) + ".\n")
    run_dir = tmp_path / "run"
    res = _raylm(["submit", "--address", head["address"], "--", "data", "--input", str(corpus),
                  "--run-dir", str(run_dir), "tokenizer.vocab_size=300", "data.num_blocks=2",
                  # doc ids hash their path, so the split follows pytest's tmp dir: at the default 0.05, 60 docs
                  # left validation empty in ~5% of dirs (0.95**60); at 0.2, in ~1 in 700,000
                  "data.tokenize.seq_len=64", "data.tokenize.val_fraction=0.2"],
                 head["token"], timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "SUCCEEDED" in res.stderr
    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "data").rglob("*.parquet")), sorted(p.name for p in (run_dir / "data").rglob("*"))


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_with_a_reward_function_file_runs_as_a_job(head, tmp_path):
    """A reward function named by its file travels with the job (the checkout's zip) and scores on the cluster."""
    import json

    from alignment_fixtures import build_causal_lm

    from cluster.rundir import read_metrics

    run_dir = tmp_path / "run"
    build_causal_lm(run_dir / "sft" / "model")  # no reward model: the function is the reward
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?"}) + "\n" for a, b in ((1, 2), (3, 4))))
    res = _raylm(["submit", "--address", head["address"], "--", "ppo", "--run-dir", str(run_dir), "--data",
                  str(prompts), "ppo.algorithm=grpo", "ppo.group_size=2", "ppo.rollout_batch_size=4",
                  "ppo.micro_batch_size=4", "ppo.max_new_tokens=4", "ppo.iterations=1", "ppo.use_reward_model=false",
                  "ppo.reward_functions=[pipelines/tasks/arithmetic.py:correct]"], head["token"], timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    (step,) = [m for m in read_metrics(run_dir / "ppo") if "reward_mean" in m]
    assert 0 <= step["reward/arithmetic:correct"] <= 1 and step["reward_fn_errors"] == 0
    assert (run_dir / "ppo" / "model" / "config.json").is_file()
