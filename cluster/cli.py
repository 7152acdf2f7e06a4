"""The ``raylm`` command: one sub-command per stage, plus ``run``, ``submit`` and ``jobs``.

Stage code is imported lazily inside each command (the one place cluster/ reaches up the layers), so
``raylm --help`` and recipe validation stay fast and never start Ray.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from cluster.commands import STAGE_ENTRYPOINTS, build_parser
from cluster.config import ConfigError
from cluster.recipe import load_recipe, save_resolved
from cluster.rundir import RunDir
from cluster.runtime import init_ray, setup_logging
from cluster.stage import StageContext, StageNotBuilt, Timer

__all__ = ["STAGE_ENTRYPOINTS", "build_parser", "main"]

log = logging.getLogger("raylm")

# Stage flags that are shorthands for recipe keys, so the resolved config records them.
FLAG_OVERRIDES = {
    "input": "data.input",
    "data": {"sft": "sft.data", "reward": "reward.data", "ppo": "ppo.prompts"},
    "model": {"serve": "serve.model", "eval": "eval.models"},
    "text": "eval.text",
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
    from cluster.progress import PipelineProgress

    entrypoints = [(stage, resolve_entrypoint(stage)) for stage in stages]  # fail before any work
    results = []
    with PipelineProgress(stages) as progress:
        for stage, fn in entrypoints:
            progress.start(stage)
            with Timer() as t:
                summary = fn(ctx) or {}
            from pipelines.lineage import record_stage
            record_stage(ctx.run_dir.root, ctx.recipe, stage)  # what the stage read and wrote, as hashes
            progress.done(stage, t.seconds, summary)
            results.append({"stage": stage, "seconds": round(t.seconds, 1), **summary})
    return results


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "submit":
            from cluster.jobs import submit_command
            return submit_command(args)
        if args.command == "jobs":
            from cluster.jobs import jobs_command
            return jobs_command(args)
        if args.command == "lineage":
            from pipelines.lineage import lineage_command
            return lineage_command(args.model_dir)
        if args.command == "k8s":
            from cluster.k8s import k8s_command
            return k8s_command(args)
        stages = args.stages.split(",") if args.command == "run" else [args.command]
        unknown = [s for s in stages if s not in STAGE_ENTRYPOINTS]
        if unknown:
            raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages: {', '.join(STAGE_ENTRYPOINTS)}")
        overrides = list(args.overrides)
        for stage in stages:
            overrides += _stage_overrides(args, stage)
        recipe = load_recipe(args.config, overrides)  # validated before Ray starts
        run_dir = RunDir.create(args.run_dir or Path("runs") / recipe.name, stages)
        saved = save_resolved(recipe, run_dir.root)
        log.info("recipe %s -> resolved config %s", recipe.name, saved)
        ctx = StageContext(recipe=recipe, run_dir=run_dir, address=args.address,
                           options={"block": not getattr(args, "no_block", False)})
        for stage in stages:
            entrypoint = resolve_entrypoint(stage)  # a stage that is not built fails here, before Ray starts
            preflight = getattr(sys.modules[entrypoint.__module__], "preflight", None)
            if preflight is not None:
                preflight(ctx)  # a stage's own inputs (files, names) are checked before any stage runs
        init_ray(recipe.ray, args.address)
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
