"""Fixtures shared by the serving tests: a tiny chat model built here (no downloads) and a deployed app."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    from tiny_chat_model import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def deployed(run_dir: Path, model_dir: Path, overrides: list[str], block: bool = False):
    """Deploy the raylm app on the session cluster through the stage entry, on a free port; shut Serve down
    after. Serve is shut down first too: http_options only apply when Serve starts."""
    from ray import serve

    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir
    from cluster.stage import StageContext
    from serve.stage import run

    serve.shutdown()
    recipe = load_recipe(None, [f"serve.model={model_dir}", f"serve.port={free_port()}", *overrides])
    ctx = StageContext(recipe=recipe, run_dir=RunDir.create(run_dir), options={"block": block})
    try:
        yield run(ctx), ctx
    finally:
        serve.shutdown()
