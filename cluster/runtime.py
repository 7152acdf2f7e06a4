"""Ray start-up: join a cluster (``--address`` / ``RAY_ADDRESS``) or start a local one sized to the machine."""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cluster.recipe import PROJECT_ROOT, RayConfig
from cluster.storage import ObjectPath, location, storage_env
from cluster.upload import DEFAULT_LIMIT_MB, plan_upload

log = logging.getLogger("raylm")

# Environment every Ray worker of ours gets: no tokenizer thread pools inside already-parallel workers (they
# oversubscribe small machines and warn after fork), and no per-step torch FutureWarnings from ZeRO collectives.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Serve's documented high-throughput mode (Ray >= 2.56): user code and the router on the replica's main
    # event loop, gRPC between deployments, buffered request-path logs. Measured on the serving path (proxy,
    # ingress, engine): 1.09 ms of CPU per output token against 1.58-1.75 without it (docs/serving.md).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}

# Ray Serve's HAProxy ingress (recipe ray.serve_ingress), read by the Serve controller, proxies and replicas from
# their process environment: set on the pods (cluster/k8s.py) or inherited from the driver that starts a local
# cluster. Health checks every 1 s (Ray's default: 5 s) so a dead replica leaves the backend within ~1-2 s.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "1s"}
SERVE_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
# Ports Serve's HAProxy mode binds at fixed numbers on every node (stats page, Prometheus exporter, the head's
# fallback Serve proxy and its gRPC port): a second local cluster on the same machine would fail to start its
# HAProxy. A local cluster takes free ones.
HAPROXY_FIXED_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                       "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def serve_ingress_env(ingress: str, local: bool) -> dict[str, str]:
    """The process environment of a cluster whose Serve ingress is ``ingress`` ("auto", "haproxy" or "proxy";
    "auto": HAProxy on pods, Serve's proxy on a ``local`` cluster, see RayConfig.serve_ingress)."""
    haproxy = ingress == "haproxy" or (ingress == "auto" and not local)
    return dict(HAPROXY_ENV if haproxy else SERVE_PROXY_ENV)


def export_serve_ingress_env(ingress: str) -> None:
    """Export the Serve ingress env for the local cluster this process starts (its processes inherit the
    driver's environment); what the user exported already wins."""
    for key, value in serve_ingress_env(ingress, local=True).items():
        os.environ.setdefault(key, value)
    if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        log.warning("Serve's HAProxy ingress on a local cluster: HAProxy's stats page and Prometheus exporter "
                    "(read-only, no auth) listen on all interfaces whatever serve.host says; the API stays on "
                    "serve.host")
        for key in HAPROXY_FIXED_PORTS:
            os.environ.setdefault(key, str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_logging_done = False


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (as ``logging.lastResort`` does), so a rich progress
    bar that redirects stderr while it is live prints our lines above itself instead of through it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the ``raylm`` logger once per process (idempotent): our console handler on it. Records still
    propagate to the root logger, which has no handler in the CLI (nothing prints twice), so handlers put on
    the root by whoever embeds raylm (pytest's ``caplog``, an application's logging config) see them too."""
    global _logging_done
    if _logging_done:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("raylm")
    root.addHandler(handler)
    root.setLevel(level)
    _logging_done = True


def project_runtime_env(working_dir: str | None = None, storage: str = "settings") -> dict:
    """runtime_env for our workers; ``working_dir``: the checkout's zip (``cluster.upload``) for clusters on
    other machines. ``storage``: which object-store variables of this environment go along: "settings"
    (endpoint, region), "all" (credentials too: to a local cluster only, see ``cluster.storage``), "none"."""
    stored = {} if storage == "none" else storage_env(secrets=storage == "all")
    env: dict = {"env_vars": {**stored, **WORKER_ENV}}
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if ext_dir:
        env["env_vars"]["TORCH_EXTENSIONS_DIR"] = ext_dir
    if working_dir:
        env["working_dir"] = working_dir
    return env


@contextmanager
def shipped_project(limit_mb: float = DEFAULT_LIMIT_MB):
    """The checkout as a zip for the duration of an upload (see cluster/upload.py for what it holds)."""
    plan = plan_upload(PROJECT_ROOT)
    plan.check_limit(limit_mb)
    with tempfile.TemporaryDirectory(prefix="raylm-upload-") as tmp:
        yield plan, str(plan.write_zip(Path(tmp) / "raylm-project.zip"))


def init_ray(cfg: RayConfig | None = None, address: str | None = None, quiet: bool | None = None):
    """Connect to ``address`` / ``RAY_ADDRESS`` / ``cfg.address`` or start a fresh local cluster.

    Returns the ``ray`` module. Idempotent: an already-initialised driver is reused. ``quiet`` (default: unless
    ``RAYLM_RAY_LOGS=1``): workers' output stays in Ray's log files instead of being copied to this console.
    """
    import ray

    from cluster.progress import ray_logs_on_console

    setup_logging()
    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    quiet = not ray_logs_on_console() if quiet is None else quiet
    address = address or os.environ.get("RAY_ADDRESS") or cfg.address
    kwargs: dict = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": logging.WARNING}
    if address:
        # A job submitted with `raylm submit` already runs inside the cluster with the project on its path.
        inside_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        log.info("joining Ray cluster at %s", address)
        if inside_job:
            # (its runtime env, the --env values included, already reaches every worker of the job)
            ray.init(address=address, runtime_env=project_runtime_env(storage="none"), **kwargs)
        else:
            with shipped_project() as (plan, zip_path):
                log.info("shipping this checkout to the cluster: %s", plan.summary())
                ray.init(address=address, runtime_env=project_runtime_env(zip_path), **kwargs)
    else:
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray cluster (%d CPUs)", num_cpus)
        local: dict = {"num_cpus": num_cpus,
                       "_system_config": {"num_workers_soft_limit": idle_worker_limit(num_cpus)}}
        if cfg.num_gpus is not None:
            local["num_gpus"] = cfg.num_gpus
        if cfg.object_store_memory_mb:
            local["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        export_serve_ingress_env(cfg.serve_ingress)
        # address="local": never join a stale cluster left in /tmp/ray by a killed run.
        with node_ip_on_loopback():
            ray.init(address="local", runtime_env=project_runtime_env(storage="all"), **kwargs, **local)
    return ray


def connected_ray():
    """The Ray runtime of this process, started once by its one owner: ``init_ray``, called by the CLI (or a
    benchmark, or the tests' ``ray_cluster`` fixture). Stages and the training engine use it and never start
    Ray themselves: a second start would be a bare ``ray.init`` (Ray Train and Ray Data start one when none is
    up) without our worker environment, cluster size or loopback binding."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not started: run stages through `raylm` (or call cluster.runtime.init_ray "
                           "before a stage's run())")
    return ray


@contextmanager
def node_ip_on_loopback():
    """Start a local cluster whose every process listens on 127.0.0.1 only.

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address
    (``services.resolve_ip_for_localhost``), and the GCS, raylet, workers and agents bind to that node address:
    measured with ``ss -ltnp``, 11 of 13 listening sockets were on the network. Ray keeps single-machine
    clusters on loopback where it disables multi-node clusters (macOS/Windows, switch
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``); that switch is read once, when ray is imported, so its constant is
    set here for the start-up. With it: 10 of 10 on loopback (tests/test_runtime.py checks every one).
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def idle_worker_limit(num_cpus: int) -> int:
    """Idle worker processes a local raylet keeps. Ray's default (= num_cpus) is too few on a small machine:
    Ray Data's own actors take slots, so every task beyond them started a fresh Python process that was killed
    1 s after going idle. Measured on 2 cores: a 480k-row repartition took 3.6-4.7 s with the default and
    0.17-0.21 s with 8 (benchmarks/dedup.py, docs/data.md)."""
    return max(8, 2 * num_cpus)


def storage_path(run_dir) -> str:
    """Ray Train storage for a run: the run dir itself (shared storage or an object-store URI, which Ray Train
    resolves with pyarrow like the rest of the run)."""
    run_dir = location(run_dir)
    return run_dir.uri if isinstance(run_dir, ObjectPath) else str(Path(run_dir).resolve())
