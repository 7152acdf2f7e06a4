"""Shared fixtures. Ray tests share ONE local cluster per session (``ray_cluster``); mark them ``ray``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
