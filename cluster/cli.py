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

from cluster.config import ConfigError
from cluster.recipe import DEFAULT_RECIPE, load_recipe, save_resolved
from cluster.rundir import RunDir
from cluster.runtime import init_ray, setup_logging
from cluster.stage import StageContext, StageNotBuilt, Timer

log = logging.getLogger("raylm")

# stage -> (module:function, help). Each function takes a StageContext and returns a summary dict.
STAGE_ENTRYPOINTS = {
    "data": ("pipelines.data.stage:run", "stream, clean, filter, dedupe, tokenize and pack the corpus"),
    "pretrain": ("pipelines.pretrain.stage:run", "pretrain the model with Ray Train + DeepSpeed"),
    "sft": ("pipelines.sft.stage:run", "supervised fine-tuning on chat data"),
    "reward": ("pipelines.reward.stage:run", "train the pairwise reward model"),
    "ppo": ("actors.ppo.stage:run", "PPO/GRPO with policy, critic, reward and reference Ray actors"),
    "eval": ("pipelines.eval.stage:run", "bits per byte, lm-eval tasks, samples and reward accuracy of the models"),
    "serve": ("serve.stage:run", "serve the model: OpenAI-compatible API + Gradio chat demo"),
}

# Stage flags that are shorthands for recipe keys, so the resolved config records them.
FLAG_OVERRIDES = {
    "input": "data.input",
    "data": {"sft": "sft.data", "reward": "reward.data", "ppo": "ppo.prompts"},
    "model": {"serve": "serve.model", "eval": "eval.models"},
    "text": "eval.text",
    "host": "serve.host",
    "port": "serve.port",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=str(DEFAULT_RECIPE), metavar="RECIPE",
                   help="YAML recipe (default: configs/tiny-cpu.yaml)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides, e.g. pretrain.zero_stage=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="raylm: a raw corpus to a served chat model, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline (or --stages) and leave the chat demo up")
    _common(p)
    p.add_argument("--stages", default=",".join(STAGE_ENTRYPOINTS), help="comma-separated stages to run, in order")
    p.add_argument("--no-block", action="store_true", help="with serve: return once the app is up")
    for stage, (_, text) in STAGE_ENTRYPOINTS.items():
        p = sub.add_parser(stage, help=text, description=text)
        _common(p)
        if stage == "data":
            p.add_argument("--input", action="append", metavar="PATH", help="corpus file/dir/URI (repeatable)")
        if stage in ("sft", "reward", "ppo"):
            p.add_argument("--data", metavar="PATH", help="replaces the stage's built-in data")
        if stage == "serve":
            p.add_argument("--model", help="HF model dir (default: the run's latest trained model)")
            p.add_argument("--host")
            p.add_argument("--port", type=int)
            p.add_argument("--no-block", action="store_true", help="return once the app is up")
        if stage == "eval":
            p.add_argument("--model", action="append", metavar="DIR", help="HF model dir (repeatable; default: "
                           "every model of the run); lm-eval tasks: eval.tasks=[NAME,...]")
            p.add_argument("--text", action="append", metavar="PATH", help="held-out text file/dir (repeatable; "
                           "default: the data stage's validation split)")
    p = sub.add_parser("submit", help="submit a raylm command to a Ray cluster as a job (Ray Jobs API)")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for the job")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None)
    p.add_argument("--entrypoint-num-gpus", type=float, default=None)
    p.add_argument("--python", help="the job's Python (default: this one on a local cluster, else `python`)")
    p.add_argument("--pip", action="append", metavar="REQ", help="extra pip requirement for the job (repeatable)")
    p.add_argument("--no-working-dir", action="store_true", help="don't upload this checkout (image has it)")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="raylm command and args")
    p = sub.add_parser("k8s", help="render the KubeRay manifests (k8s/overlays/*/generated) from the recipes")
    from cluster.k8s import add_arguments as add_k8s_arguments
    add_k8s_arguments(p)
    p = sub.add_parser("lineage", help="the chain from a model dir back to the corpus files, checked by hash")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="e.g. runs/tiny-cpu/ppo/model (or a stage dir)")
    p = sub.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="with logs: follow until the job ends")
    return parser


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
        run_dir = RunDir.create(args.run_dir or Path("runs") / recipe.name)
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
