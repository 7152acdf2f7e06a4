"""``raylm submit``: run a raylm command on a Ray cluster through the Ray Jobs API.

It adds to Ray's own ``ray job submit`` what Ray cannot know: the command and its recipe are checked before
anything is sent, paths are rewritten for the cluster, and the upload is exactly git's files minus secrets.
Listing, inspecting, following and stopping jobs is Ray's ``ray job list/status/logs/stop`` (docs/operations.md).

The job carries this checkout as its ``working_dir`` (with the excludes of ``cluster.runtime``), so a cluster
on another machine runs exactly the code and recipes you have here. Paths on the command line are made
portable before submitting: files shipped with the project stay relative to it (they exist in the job's
working_dir), every other path becomes absolute (it must exist on the cluster: shared storage).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlparse

from cluster.commands import PATH_FLAGS, build_parser, default_stages
from cluster.config import ConfigError
from cluster.recipe import PROJECT_ROOT, load_recipe
from cluster.rundir import check_stages
from cluster.runtime import project_runtime_env
from cluster.schemas.rlhf import RewardFunctionSpec
from cluster.upload import UploadError, UploadPlan, human_bytes, plan_upload

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Commands that cannot run inside a job: they would submit again.
NOT_SUBMITTABLE = ("submit",)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CLUSTER_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
# `--model org/name` that is not a local path: a Hugging Face hub id, which transformers resolves on the cluster.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SECRETISH = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)


class JobsError(RuntimeError):
    """A problem talking to the cluster or with the submitted command; the message says what to do."""


# ---------------------------------------------------------------- pure helpers (unit-tested)

def dashboard_address(explicit: str | None, env: dict | None = None) -> str:
    """--address, else $RAY_ADDRESS, else the local dashboard; a bare host:port gets http://."""
    env = os.environ if env is None else env
    address = explicit or env.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if address.startswith("ray://"):
        raise JobsError(f"--address {address}: the Jobs API talks to the dashboard (http://HEAD:8265), "
                        "not the Ray Client port")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves elsewhere for all we know
        return False


def plain_http_warning(address: str) -> str | None:
    """The token is a bearer credential: over http to another machine anyone on the path can read it."""
    if urlparse(address).scheme == "http" and not is_loopback(address):
        return (f"warning: the Ray auth token goes to {address} over plain http: anyone on the network path can "
                f"read it and run code on the cluster; use https (an ingress with TLS) or a port-forward/SSH "
                f"tunnel to 127.0.0.1")
    return None


def auth_headers(env: dict | None = None, home: Path | None = None) -> dict[str, str]:
    """The bearer token for a token-auth cluster (on by default for ``ray start`` clusters in Ray 2.60).

    Ray's own client only sends a token when RAY_AUTH_MODE=token is set; we send one whenever it is found
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), unless RAY_AUTH_MODE=disabled.
    """
    env = os.environ if env is None else env
    mode = (env.get("RAY_AUTH_MODE") or "").lower()
    if mode == "disabled":
        return {}
    token = (env.get("RAY_AUTH_TOKEN") or "").strip()
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or (home or Path.home()) / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text(encoding="utf-8").strip()
        elif mode == "token":
            raise JobsError(f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or put the cluster's token "
                            f"in {path} (on the head node: `ray get-auth-token`)")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _shipped(path: Path, project_root: Path, shipped: Collection[str] | None) -> bool:
    """True when ``path`` is uploaded with the working_dir: a shipped file or a folder holding one.
    ``shipped=None``: the project is not uploaded (the image holds it), so any path inside it counts."""
    try:
        rel = path.relative_to(project_root).as_posix()
    except ValueError:
        return False
    if shipped is None:
        return rel != "."
    return rel in shipped or any(f.startswith(rel + "/") for f in shipped)


def portable_path(value: str, cwd: Path, project_root: Path, shipped: Collection[str] | None = None,
                  flag: str = "") -> str:
    """A path as the job must see it: relative inside the shipped project, else absolute; URIs unchanged, and
    so is a ``--model`` / ``--tokenizer`` hub id (``org/name`` that is no local path)."""
    if "://" in value:
        return value
    path = (cwd / value).resolve() if not os.path.isabs(value) else Path(value)
    if flag in ("--model", "--tokenizer") and HUB_ID.fullmatch(value) and not path.exists():
        return value
    if _shipped(path, project_root, shipped):
        return str(path.relative_to(project_root))
    return str(path)


def portable_args(args: list[str], cwd: Path, project_root: Path = PROJECT_ROOT,
                  shipped: Collection[str] | None = None) -> list[str]:
    """Rewrite the values of path flags (``--config x`` and ``--config=x``) with ``portable_path``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if eq and flag in PATH_FLAGS:
            out.append(f"{flag}={portable_path(value, cwd, project_root, shipped, flag)}")
        elif arg in PATH_FLAGS and i + 1 < len(args):
            out += [arg, portable_path(args[i + 1], cwd, project_root, shipped, arg)]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def build_entrypoint(python: str, command_args: list[str]) -> str:
    """The shell command the job runs: ``<python> -m cluster.cli <args>`` (the job's cwd is the project)."""
    return shlex.join([python, "-m", "cluster.cli", *command_args])


def _env_name(name: str, flag: str) -> str:
    if not ENV_NAME.fullmatch(name):
        raise JobsError(f"{flag} {name!r}: not an environment variable name")
    return name


def parse_env(pairs: list[str], env_files: list[str] = (), cluster_refs: list[str] = (),
              local: dict | None = None) -> dict[str, str]:
    """The job's environment variables, later sources winning: ``--env-file FILE`` (dotenv syntax), ``--env
    K=V``, ``--env K`` (K's value on this machine, as ``docker run -e K``), ``--cluster-env K[=NODE_VAR]``
    (the reference ``${NODE_VAR}``: Ray resolves it on each node from that node's environment)."""
    from dotenv import dotenv_values

    local = os.environ if local is None else local
    env: dict[str, str] = {}
    for name in env_files:
        path = Path(name)
        if not path.is_file():
            raise JobsError(f"--env-file {name}: no such file")
        for key, value in dotenv_values(path, interpolate=False).items():
            if value is None:
                raise JobsError(f"--env-file {name}: {key} has no value (write {key}=VALUE)")
            env[_env_name(key, f"--env-file {name}:")] = value
    for pair in pairs:
        key, eq, value = pair.partition("=")
        _env_name(key, "--env")
        if not eq:
            if key not in local:
                raise JobsError(f"--env {key}: not set on this machine; give --env {key}=VALUE")
            value = local[key]
        env[key] = value
    for ref in cluster_refs:
        key, _, node_var = ref.partition("=")
        env[_env_name(key, "--cluster-env")] = "${" + _env_name(node_var or key, "--cluster-env") + "}"
    return env


def exposed_secrets(env: dict[str, str]) -> list[str]:
    """Names that look like secrets whose values (not a cluster reference) travel in the Jobs API."""
    return [k for k, v in env.items() if SECRETISH.search(k) and not CLUSTER_REF.fullmatch(v)]


# ---------------------------------------------------------------- preparing a submission

def strip_prefix(command_args: list[str]) -> list[str]:
    """``-- raylm data ...`` and ``data ...`` mean the same command."""
    args = list(command_args)
    for word in ("--", "raylm"):
        if args and args[0] == word:
            args = args[1:]
    return args


def check_command(command_args: list[str]) -> argparse.Namespace:
    """Parse the command with raylm's own parser, so a typo fails here and not minutes later on the cluster."""
    command_args = strip_prefix(command_args)
    if not command_args:
        raise JobsError("submit: nothing to run; usage: raylm submit [--address URL] -- data -c configs/x.yaml")
    if command_args[0] in NOT_SUBMITTABLE:
        raise JobsError(f"submit: {command_args[0]!r} cannot run as a job")
    try:
        return build_parser().parse_args(command_args)
    except SystemExit:
        raise JobsError(f"submit: not a valid raylm command: {shlex.join(command_args)}") from None


def portable_reward_functions(args: list[str], overrides: list[str], entries: list[str], cwd: Path,
                              project_root: Path = PROJECT_ROOT, shipped: Collection[str] | None = None
                              ) -> list[str]:
    """Make ``ppo.reward_functions`` files resolvable in the job, whose cwd is the uploaded project: each file
    entry becomes relative to the project (or absolute with ``shipped=None``, the image holding the project).
    A file that does not exist here, or that the upload does not carry (outside the checkout, git-ignored,
    withheld), is refused now rather than failing on the cluster. The rewritten list replaces the user's own
    ``ppo.reward_functions=`` override in place, or follows the last override (the last one wins; overrides
    stay one contiguous run, as argparse needs)."""
    rewritten, changed = [], False
    for i, entry in enumerate(entries):
        spec = RewardFunctionSpec.parse(entry, f"ppo.reward_functions[{i}]")
        if not spec.is_file:
            rewritten.append(entry)
            continue
        path = (cwd / spec.source).resolve()
        if not path.is_file():
            raise JobsError(f"submit: ppo.reward_functions[{i}]: {entry!r}: no such file {path} (paths are "
                            f"relative to the directory raylm runs in)")
        if not _shipped(path, project_root, shipped):
            where = "outside the checkout" if not path.is_relative_to(project_root) else "git-ignored or withheld"
            if shipped is not None:
                raise JobsError(f"submit: ppo.reward_functions[{i}]: {entry!r}: {path} is {where}, so the upload "
                                f"to the cluster would not carry it; move it into {project_root} as a file git "
                                f"tracks or does not ignore (or pass --no-working-dir and keep it at this path "
                                f"on every node)")
        source = portable_path(str(path), cwd, project_root, shipped)
        rewritten.append(source + entry[len(spec.source):])  # keeps ":function*weight" as written
        changed = changed or source != spec.source
    if not changed:
        return args
    override = "ppo.reward_functions=" + json.dumps(rewritten)  # JSON is YAML: paths with spaces stay whole
    mine = [i for i, a in enumerate(args) if a in overrides and a.split("=", 1)[0].strip() == "ppo.reward_functions"]
    if mine:
        return [override if i == mine[-1] else a for i, a in enumerate(args)]
    at = max((i for i, a in enumerate(args) if a in overrides), default=len(args) - 1) + 1
    return args[:at] + [override] + args[at:]


def prepare_command(command_args: list[str], cwd: Path, shipped: Collection[str] | None = None) -> list[str]:
    """Validate the command (and its recipe) locally, pin the run dir, make paths portable."""
    command_args = strip_prefix(command_args)
    parsed = check_command(command_args)
    args = list(command_args)
    if hasattr(parsed, "run_dir"):  # a stage or `run`: it has a recipe and a run directory
        # `raylm report RUN_DIR`: the run dir may come as the one positional word (cluster.cli._report)
        positional = [a for a in parsed.overrides if "=" not in a] if parsed.command == "report" else []
        overrides = [a for a in parsed.overrides if a not in positional]
        recipe = load_recipe(parsed.config, overrides)  # ConfigError here: nothing submitted
        if parsed.command != "run":
            stages = [parsed.command]
        else:
            stages = parsed.stages.split(",") if parsed.stages else default_stages(
                recipe.alignment, from_model=bool(recipe.sft.base_model), eval_text=bool(recipe.eval.text))
        for run_dir in [parsed.run_dir, *positional]:
            if run_dir:
                check_stages(run_dir, stages)
        if positional:
            args = [portable_path(a, cwd, PROJECT_ROOT, shipped) if a in positional else a for a in args]
        if "ppo" in stages:  # the stage loads its reward functions in the job, from the job's cwd
            args = portable_reward_functions(args, parsed.overrides, recipe.ppo.reward_functions, cwd,
                                             shipped=shipped)
        if not parsed.run_dir and not positional:
            # The job's cwd is a temporary copy of the project: pin the default run dir to where it would be here.
            args[1:1] = ["--run-dir", str(cwd / "runs" / recipe.name)]
    return portable_args(args, cwd, shipped=shipped)


def runtime_env(extra_env: dict[str, str], pip: list[str], working_dir: str | None) -> dict:
    """The job's runtime_env: the project's zip and the user's env vars. Not our worker env vars: the job's
    driver (`init_ray`) adds those itself, and Ray refuses a driver runtime_env that repeats a job's key."""
    env = project_runtime_env(working_dir, storage="none")
    reserved = set(env.pop("env_vars")) | {"TORCH_EXTENSIONS_DIR"}
    clash = sorted(reserved & set(extra_env))
    if clash:
        raise JobsError(f"--env {clash[0]}: raylm sets it for the job's workers itself; set it on the cluster's "
                        f"nodes instead")
    if extra_env:
        env["env_vars"] = dict(extra_env)
    if pip:
        env["pip"] = list(pip)
    return env


def describe_env(env: dict[str, str]) -> str:
    """Names only, never values: cluster references are shown, since they hold no secret."""
    return ", ".join(f"{k}={v}" if CLUSTER_REF.fullmatch(v) else k for k, v in env.items()) or "-"


def print_plan(plan: UploadPlan, out=None) -> None:
    out = out or sys.stdout
    for rel, size in plan.files:
        out.write(f"{human_bytes(size):>10}  {rel}\n")
    for rel, why in plan.withheld:
        out.write(f"{'withheld':>10}  {rel}  ({why})\n")
    out.write(f"would upload {plan.summary()}; {len(plan.withheld)} withheld\n")


# ---------------------------------------------------------------- talking to the cluster

def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    warning = plain_http_warning(address)
    if headers and warning:
        print(f"raylm: {warning}", file=sys.stderr)
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError:
        raise JobsError(f"cannot reach the Ray dashboard at {address}: is the cluster up (`ray start --head`, or "
                        f"a port-forward to the head's port 8265)? Pass --address or set RAY_ADDRESS.") from None


def cluster_error(exc: Exception, address: str) -> JobsError | None:
    """Ray's client errors, as one line naming the dashboard; None for errors that are bugs of ours."""
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        first = str(exc).splitlines()[0]
        return JobsError(f"{address}: {first} (the cluster uses token auth: set RAY_AUTH_TOKEN, or copy the "
                         f"head's token (`ray get-auth-token`) to ~/.ray/auth_token)")
    if isinstance(exc, ConnectionError):
        return JobsError(f"lost the connection to the Ray dashboard at {address}: {exc}")
    if isinstance(exc, RuntimeError):  # Ray: "Request failed with status code 404: Job ... does not exist."
        return JobsError(f"{address}: {exc}")
    return None


def follow_logs(client, job_id: str, out=None) -> None:
    """Stream the job's logs until it ends (Ray's tail is a websocket async iterator)."""
    out = out or sys.stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The log tail can end a moment before the status turns terminal: poll it with a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def report_end(client, job_id: str) -> int:
    info = client.get_job_info(job_id)
    status = str(info.status)
    print(f"raylm: job {job_id} {status}", file=sys.stderr)
    if status != "SUCCEEDED":
        if info.message:
            print(f"raylm: {info.message}", file=sys.stderr)
        return 1
    return 0


def _upload_plan(ship_project: bool) -> UploadPlan | None:
    if ship_project:
        return plan_upload(PROJECT_ROOT)
    try:  # nothing is uploaded; the listing only tells which project paths the image holds
        return plan_upload(PROJECT_ROOT)
    except UploadError:
        return None


def submit_command(args: argparse.Namespace) -> int:
    address = DEFAULT_DASHBOARD
    try:
        ship_project = not args.no_working_dir
        plan = _upload_plan(ship_project)
        shipped = {rel for rel, _ in plan.files} if plan else None
        command = prepare_command(list(args.command_args), Path.cwd(), shipped)
        address = dashboard_address(args.address)
        python = args.python or (sys.executable if is_loopback(address) else "python")
        extra_env = parse_env(args.env, args.env_file, args.cluster_env)
        exposed = exposed_secrets(extra_env)
        if exposed:
            print(f"raylm: warning: {', '.join(exposed)}: the value is stored in the job's runtime_env, readable by "
                  f"anyone who can read the Jobs API; --cluster-env NAME takes it from the cluster's nodes instead",
                  file=sys.stderr)
        if ship_project:
            print(f"raylm: uploading {plan.summary()} ({len(plan.withheld)} withheld)", file=sys.stderr)
            plan.check_limit(args.max_upload_mb)
        entrypoint = build_entrypoint(python, command)
        if args.dry_run:
            if plain_http_warning(address):
                print(f"raylm: {plain_http_warning(address)} (when the cluster uses token auth)", file=sys.stderr)
            if ship_project:
                print_plan(plan)
            print(f"entrypoint: {entrypoint}\nenv: {describe_env(extra_env)}\naddress: {address} (not contacted)")
            return 0
        client = connect(address)
        with tempfile.TemporaryDirectory(prefix="raylm-upload-") as tmp:
            # Ray uploads the zip during submit_job (content-addressed: unchanged code is not sent again).
            zip_path = str(plan.write_zip(Path(tmp) / "raylm-project.zip")) if ship_project else None
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=f"raylm-{command[0]}-{uuid.uuid4().hex[:8]}",
                runtime_env=runtime_env(extra_env, args.pip or [], zip_path),
                entrypoint_num_cpus=args.entrypoint_num_cpus,
                entrypoint_num_gpus=args.entrypoint_num_gpus,
                metadata={"raylm_command": shlex.join(command)[:1000]},
            )
        print(job_id, flush=True)
        print(f"raylm: submitted {job_id} to {address}: raylm {shlex.join(command)}", file=sys.stderr)
        if args.no_wait:
            return 0
        try:
            follow_logs(client, job_id)
        except KeyboardInterrupt:
            print(f"\nraylm: stopped following; the job goes on (ray job stop {job_id})", file=sys.stderr)
            return 130
        wait_terminal(client, job_id)
        return report_end(client, job_id)
    except ConfigError as exc:
        print(f"raylm: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        err = exc if isinstance(exc, (JobsError, UploadError)) else cluster_error(exc, address)
        if err is None:
            raise
        print(f"raylm: {err}", file=sys.stderr)
        return 1
