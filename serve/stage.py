"""``raylm serve``: deploy the run's model (or ``--model DIR``) as the ``raylm`` Serve application, wait until
it answers, print the API and demo URLs, and block until Ctrl-C (``ctx.options["block"]`` false: return)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.config import atomic_write_json
from cluster.stage import StageContext

log = logging.getLogger("raylm.serve")
HEALTH_TIMEOUT_S = 120


def resolve_model_dir(ctx: StageContext) -> Path:
    """``serve.model`` (--model), else ``<run-dir>/<alignment>/model`` (ppo or dpo, as the recipe says), else
    the latest stage with a model."""
    explicit = ctx.recipe.serve.model
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"serve.model: {path} is not a Hugging Face model dir (no config.json)")
        return path
    found = ctx.run_dir.latest_model(ctx.recipe.alignment)  # the recipe's ppo or dpo, then sft, then pretrain
    if found is None:
        raise FileNotFoundError(f"serve: no trained model in {ctx.run_dir.root} (looked for ppo/, dpo/, sft/, "
                                f"pretrain/ model dirs); train one or pass --model DIR")
    return found


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Poll the health route until it answers 200 (the proxy may route a moment after serve.run returns)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.25)  # poll interval, bounded by the deadline above
    raise TimeoutError(f"serve: {url} did not become healthy within {timeout_s:g} s ({last})")


def endpoint_urls(host: str, port: int) -> dict:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    return {"api": f"{base}/v1", "demo": f"{base}/demo/", "health": f"{base}/health"}


def deploy(ctx: StageContext) -> dict:
    """Start (or update) the application; return its URLs once healthy."""
    from ray import serve

    from serve.app import APP_NAME, build_from_config
    from serve.ingress import read_api_key

    cfg = ctx.recipe.serve
    report = ctx.run_dir.root / "report" / "report.html"
    if cfg.report is None and cfg.model is None and report.is_file():  # the run's own model: its report
        cfg = dataclasses.replace(cfg, report=str(report))
    elif cfg.report and not Path(cfg.report).is_file():
        raise FileNotFoundError(f"serve.report: {cfg.report} does not exist (raylm report RUN_DIR writes it)")
    model_dir = resolve_model_dir(ctx)
    keyed = read_api_key(cfg) is not None  # a missing key file fails here, not in a replica
    ctx.ray()  # started by the CLI; Serve runs on it
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_from_config(cfg, model_dir), name=APP_NAME, route_prefix="/")
    urls = endpoint_urls(cfg.host, cfg.port)
    wait_healthy(urls["health"])
    if cfg.report:
        urls["report"] = urls["health"].rsplit("/", 1)[0] + "/report"
    info = {**urls, "model": str(model_dir), "model_name": cfg.model_name, "app": APP_NAME, "api_key": keyed}
    atomic_write_json(ctx.stage_dir("serve") / "endpoint.json", info)
    return info


def run(ctx: StageContext) -> dict:
    info = deploy(ctx)
    key = " (API key required)" if info["api_key"] else ""
    demo = " (log in with any user name and the API key as password)" if info["api_key"] else ""
    print(f"raylm serve: model {info['model']}\n  API:  {info['api']}  (OpenAI-compatible, model "
          f"{info['model_name']!r}){key}\n  demo: {info['demo']}{demo}", flush=True)
    if "report" in info:
        print(f"  report: {info['report']} (the run report; with an API key, the key as password)", flush=True)
    if ctx.options.get("block", True):
        _block_until_interrupted()
    elif not (ctx.address or os.environ.get("RAY_ADDRESS") or ctx.recipe.ray.address):
        log.warning("serve: --no-block on the local Ray cluster this process started: the app lives only as "
                    "long as this process (use --address to leave it on a running cluster)")
    return {k: info[k] for k in ("api", "demo", "health", "model", "report") if k in info}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _block_until_interrupted() -> None:
    from ray import serve

    from serve.app import APP_NAME

    print("raylm serve: serving; Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` / a pod stop: the same clean exit as Ctrl-C
    try:
        while True:
            time.sleep(3600)  # nothing to poll: the app runs in Ray; we only wait for Ctrl-C
    except KeyboardInterrupt:
        # Serve's direct ingress keeps the ingress replica draining for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
        # (30 s) before it stops, so requests in flight finish and proxies stop routing to it first (measured: 35 s
        # from SIGTERM to exit). A second Ctrl-C skips the wait; the requests still running are cut.
        log.info("stopping the %s application: requests in flight get up to %s s to finish (Ctrl-C again: stop "
                 "now)", APP_NAME, os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30"))
        try:
            serve.delete(APP_NAME)
        except KeyboardInterrupt:
            log.warning("stopped without draining: requests in flight were cut")
            print(json.dumps({"stopped": APP_NAME, "drained": False}), flush=True)
            return
        print(json.dumps({"stopped": APP_NAME}), flush=True)
