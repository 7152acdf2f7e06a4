"""The ``raylm`` command: one sub-command per stage, plus ``run``, ``submit``, ``k8s`` and ``lineage``.

Stage code is imported lazily inside each command (the one place cluster/ reaches up the layers), so
``raylm --help`` and recipe validation stay fast and never start Ray.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from cluster.commands import STAGE_ENTRYPOINTS, build_parser, default_stages
from cluster.config import ConfigError, atomic_write_json
from cluster.progress import RAY_LOGS_ENV, PipelineProgress, link_worker_logs, route_ray_logs
from cluster.recipe import load_recipe, save_resolved
from cluster.rundir import RunDir
from cluster.runtime import init_ray, setup_logging
from cluster.stage import StageContext, StageNotBuilt, Timer

__all__ = ["STAGE_ENTRYPOINTS", "build_parser", "main"]

log = logging.getLogger("raylm")

# Stage flags that are shorthands for recipe keys, so the resolved config records them.
FLAG_OVERRIDES = {
    "input": "data.input",
    "data": {"sft": "sft.data", "reward": "reward.data", "ppo": "ppo.prompts", "dpo": "dpo.data"},
    "model": {"serve": "serve.model", "eval": "eval.models", "sft": "sft.base_model", "reward": "reward.base_model",
              "ppo": "ppo.policy_model", "run": "sft.base_model"},
    "text": "eval.text",
    "endpoint": "eval.endpoint",
    "api_key_env": "eval.api_key_env",
    "tokenizer": "eval.tokenizer",
    "host": "serve.host",
    "port": "serve.port",
}


def _stage_overrides(args: argparse.Namespace, stage: str) -> list[str]:
    out = []
    for flag, key in FLAG_OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if isinstance(key, dict):
            key = key.get(stage)
        if stage == "eval" and flag == "model" and getattr(args, "endpoint", None):
            if len(value) != 1:
                raise ConfigError("--model: with --endpoint, names the one served model to evaluate")
            key, value = "eval.endpoint_model", value[0]  # a served model's id, not a directory
        elif flag == "tokenizer" and Path(value).exists():
            value = str(Path(value).resolve())
        if key:
            out.append(f"{key}={_yaml_value(value)}")
    return out


def _yaml_value(value) -> str:
    import json
    return json.dumps([str(Path(v).resolve()) if "://" not in v else v for v in value]) if isinstance(value, list) \
        else json.dumps(value)


def resolve_entrypoint(stage: str):
    target, _ = STAGE_ENTRYPOINTS[stage]
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise StageNotBuilt(f"stage {stage!r} is not built yet ({module_name} does not exist)") from None
        raise
    return getattr(module, func)


def run_stages(ctx: StageContext, stages: list[str]) -> list[dict]:
    entrypoints = [(stage, resolve_entrypoint(stage)) for stage in stages]  # fail before any work
    results = []
    with PipelineProgress(stages, recipe=ctx.recipe, run_dir=ctx.run_dir) as progress:
        for stage, fn in entrypoints:
            from pipelines.lineage import check_reusable, record_stage
            check_reusable(ctx.run_dir.root, ctx.recipe, stage)  # never resume from checkpoints of changed inputs
            progress.start(stage)
            with Timer() as t:
                summary = fn(ctx) or {}
            # the stage's wall time, for the report (pipelines/report; a blocking serve never gets here)
            atomic_write_json(ctx.stage_dir(stage) / "timing.json", {"stage": stage, "seconds": round(t.seconds, 1)})
            record_stage(ctx.run_dir.root, ctx.recipe, stage)  # what the stage read and wrote, as hashes
            progress.done(stage, t.seconds, summary)
            results.append({"stage": stage, "seconds": round(t.seconds, 1), **summary})
    return results


def _report(args: argparse.Namespace) -> int:
    """``raylm report [RUN_DIR]``: the report reads files only, so no recipe section and no Ray. RUN_DIR comes in
    among the positional KEY=VALUE overrides (the stage parser's grammar), told apart by having no '='."""
    from pipelines.report.stage import report_command

    dirs = [a for a in args.overrides if "=" not in a]
    if len(dirs) > 1 or (dirs and args.run_dir):
        raise ConfigError(f"report: one run directory, got {dirs + ([args.run_dir] if args.run_dir else [])}")
    run_dir = dirs[0] if dirs else args.run_dir or Path("runs") / load_recipe(args.config, []).name
    return report_command(run_dir)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if getattr(args, "ray_logs", False):
        os.environ[RAY_LOGS_ENV] = "1"  # one switch for this process, init_ray and the jobs it starts
    try:
        if args.command == "submit":
            from cluster.jobs import submit_command
            return submit_command(args)
        if args.command == "lineage":
            from pipelines.lineage import lineage_command
            return lineage_command(args.model_dir)
        if args.command == "report":
            return _report(args)
        if args.command == "k8s":
            from cluster.k8s import k8s_command
            return k8s_command(args)
        stages = [args.command] if args.command != "run" else args.stages.split(",") if args.stages else []
        unknown = [s for s in stages if s not in STAGE_ENTRYPOINTS]
        if unknown:
            raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages: {', '.join(STAGE_ENTRYPOINTS)}")
        overrides = list(args.overrides)
        # `run --model` is sft's starting model only: reward and ppo go on from the run's sft model.
        for stage in ["run"] if args.command == "run" else stages:
            overrides += _stage_overrides(args, stage)
        recipe = load_recipe(args.config, overrides)  # validated before Ray starts
        stages = stages or default_stages(recipe.alignment, from_model=bool(recipe.sft.base_model),
                                          eval_text=bool(recipe.eval.text))
        run_dir = RunDir.create(args.run_dir or Path("runs") / recipe.name, stages)
        saved = save_resolved(recipe, run_dir.root)
        log.info("recipe %s -> resolved config %s", recipe.name, saved)
        # Ray's log files are local files: an object-store run dir keeps them in a local folder named after it
        logs = (run_dir.root / "logs" if isinstance(run_dir.root, Path)
                else Path(tempfile.gettempdir()) / "raylm-logs" / run_dir.root.name)
        ray_log = route_ray_logs(logs)  # before any stage imports Ray Data
        if ray_log:
            log.info("Ray's own logs -> %s (--ray-logs shows them here)", logs)
        ctx = StageContext(recipe=recipe, run_dir=run_dir, address=args.address,
                           options={"block": not getattr(args, "no_block", False), "stages": stages})
        ray_needed = False
        for stage in stages:
            entrypoint = resolve_entrypoint(stage)  # a stage that is not built fails here, before Ray starts
            module = sys.modules[entrypoint.__module__]
            preflight = getattr(module, "preflight", None)
            if preflight is not None:
                preflight(ctx)  # a stage's own inputs (files, names) are checked before any stage runs
            from pipelines.lineage import check_reusable
            check_reusable(ctx.run_dir.root, recipe, stage)  # again in run_stages, after the stages before it
            needs_ray = getattr(module, "needs_ray", None)  # a stage says so when it can work without Ray
            ray_needed = ray_needed or needs_ray is None or needs_ray(ctx)
        if ray_needed:  # (`raylm eval --endpoint` and `raylm report` only read files and call HTTP)
            init_ray(recipe.ray, args.address)
            if ray_log:
                link_worker_logs(logs)
        run_stages(ctx, stages)
        return 0
    except ConfigError as exc:
        print(f"raylm: config error: {exc}", file=sys.stderr)
        return 2
    except StageNotBuilt as exc:
        print(f"raylm: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:
        # Bad input (a missing stage output, a corrupt file, a bad data record): the message names the file or
        # field; a traceback would only bury it. RAYLM_TRACEBACK=1 shows it for debugging.
        if os.environ.get("RAYLM_TRACEBACK"):
            raise
        print(f"raylm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
