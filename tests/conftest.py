"""Shared fixtures. Ray tests share ONE local cluster per session (``ray_cluster``); mark them ``ray``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's direct ingress (on with RAY_SERVE_THROUGHPUT_OPTIMIZED, cluster/runtime.py) keeps an ingress replica
# draining for at least 30 s before it stops, so that proxies on other nodes stop routing to it first: every
# serve.shutdown() in the tests waited those 30 s (a dozen times a session). One node here: 1 s. Set before the
# session cluster starts, so its raylet, and through it the Serve controller and replicas, inherit it.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on loopback with 4 logical CPUs (2 cores here), started once per test session."""
    import ray

    from cluster.recipe import RayConfig
    from cluster.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto, from the dev dependencies) on loopback for the session. pyarrow and
    boto3 reach it through AWS_ENDPOINT_URL and dummy credentials, set here in the environment (a local Ray
    cluster started afterwards passes them to its workers: cluster.runtime). Yields the endpoint URL."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
