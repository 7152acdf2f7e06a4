"""``raylm eval``: bits per byte on held-out text, lm-eval tasks and greedy samples for every model of a run
(or the ``--model`` dirs), and the run's reward model's held-out accuracy, one Ray task per model; results in
``<run>/eval/results.json`` (schema: docs/evaluation.md).

Every input is checked before any model is loaded: the model directories, the held-out text (read here, on the
driver, once; the tasks share it through the object store) and the task names.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cluster.config import atomic_write_json, to_dict
from cluster.rundir import MetricsLog, RunDir
from cluster.schemas.eval import EvalConfig
from cluster.stage import StageContext
from pipelines.eval.endpoint import check_tokenizer, evaluate_endpoint, probe
from pipelines.eval.heldout import HeldOut, load_heldout
from pipelines.eval.lm_tasks import LOCAL_TASKS, check_tasks, write_local_tasks
from pipelines.eval.model_eval import ModelSpec, check_model_dir, evaluate_model
from pipelines.eval.policy import evaluate_policies
from pipelines.eval.reward_eval import evaluate_reward_model

log = logging.getLogger("raylm")

SCHEMA_VERSION = 1
RUN_MODELS = ("pretrain", "sft", "ppo", "dpo")  # pipeline order; the reward model is a scorer, not a language model
RESULTS = "results.json"


def _has_chat_template(path: Path) -> bool:
    import json

    config = path / "tokenizer_config.json"
    return (path / "chat_template.jinja").is_file() or (
        config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template")))


def explicit_spec(path: Path) -> ModelSpec:
    """A ``--model`` dir. ``<run>/<stage>/model`` keeps its stage's name and sample format; any other dir is
    named after itself and sampled as chat when its tokenizer has a chat template."""
    check_model_dir(path)
    if path.name == "model" and path.parent.name in RUN_MODELS:
        return ModelSpec(path.parent.name, str(path), chat=path.parent.name != "pretrain")
    return ModelSpec(path.name, str(path), chat=_has_chat_template(path))


def resolve_models(cfg: EvalConfig, run_dir: RunDir) -> list[ModelSpec]:
    if cfg.models:
        specs = [explicit_spec(Path(p).expanduser().resolve()) for p in cfg.models]
    else:
        specs = [ModelSpec(stage, str(run_dir.model_dir(stage)), chat=stage != "pretrain")
                 for stage in RUN_MODELS if (run_dir.model_dir(stage) / "config.json").is_file()]
        if not specs:
            raise FileNotFoundError(f"{run_dir.root}: no trained model ({', '.join(RUN_MODELS)}/model); run "
                                    "`raylm pretrain` first or pass --model DIR")
        for spec in specs:
            check_model_dir(Path(spec.path))
    names = [s.name for s in specs]
    # two dirs with the same name: the later ones get their path as name, so every row stays identifiable
    return [s if names.index(s.name) == i else ModelSpec(s.path, s.path, s.chat) for i, s in enumerate(specs)]


# not settings: the models, the text and the endpoint are recorded in their own entries; placement changes nothing
NOT_SETTINGS = ("models", "text", "num_cpus", "num_gpus", "device", "endpoint", "endpoint_model", "api_key_env",
                "tokenizer", "concurrency")


def results_document(cfg: EvalConfig, heldout: HeldOut | None, records: list[dict], reward: dict | None,
                     policy: dict | None = None) -> dict:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in NOT_SETTINGS}
    return {"schema_version": SCHEMA_VERSION, "heldout": heldout.describe(cfg.max_bytes) if heldout else None,
            "settings": settings, "models": records, "reward_model": reward, "policy": policy}


def run_policies(ctx: StageContext) -> dict[str, str]:
    """The run's chat policies, sft (the reference) first; {} when policy metrics are off or there is no sft."""
    cfg = ctx.recipe.eval
    if not cfg.policy or cfg.models or not (ctx.run_dir.model_dir("sft") / "config.json").is_file():
        return {}
    return {stage: str(ctx.run_dir.model_dir(stage)) for stage in ("sft", "ppo")
            if (ctx.run_dir.model_dir(stage) / "config.json").is_file()}


def timed_policies(paths: dict, reward_dir: str | None, recipe) -> dict:
    started = time.perf_counter()
    record = evaluate_policies(paths, reward_dir, recipe)
    return {"record": record, "seconds": round(time.perf_counter() - started, 2), "pid": os.getpid()}


def needs_ray(ctx: StageContext) -> bool:
    """An endpoint is evaluated over HTTP from this process (the endpoint does the work): no cluster to start."""
    return not ctx.recipe.eval.endpoint


def preflight(ctx: StageContext) -> None:
    """Checks the inputs a user names (model dirs, text files, lm-eval tasks) before Ray starts and before any
    stage of ``raylm run`` does work: a typo must not cost a training run. The run's own models and data are
    checked when the stage starts (earlier stages of the same run write them)."""
    cfg = ctx.recipe.eval
    if cfg.endpoint:
        check_tasks(cfg.tasks)
        endpoint_heldout(ctx)
        target = probe(cfg)
        if cfg.tasks:
            check_tokenizer(cfg, target)
        return
    if cfg.models:
        resolve_models(cfg, ctx.run_dir)
    if cfg.text:
        load_heldout(cfg.text, ctx.run_dir.root / "data", ctx.recipe.data.tokenize.val_fraction, cfg.text_field,
                     cfg.max_bytes)
    check_tasks(cfg.tasks)


def endpoint_heldout(ctx: StageContext) -> HeldOut | None:
    """An endpoint needs held-out text only for the ``raylm_heldout`` task (its bits per byte come from lm-eval)."""
    cfg = ctx.recipe.eval
    if not cfg.text and "raylm_heldout" not in cfg.tasks:
        return None
    return load_heldout(cfg.text, ctx.run_dir.root / "data", ctx.recipe.data.tokenize.val_fraction, cfg.text_field,
                        cfg.max_bytes)


def evaluate_endpoint_stage(ctx: StageContext) -> dict:
    """``--endpoint``: in this process (HTTP requests; the endpoint does the work), into ``<run>/eval/endpoint/``
    so that the run's own results.json stays the run's models'."""
    cfg = ctx.recipe.eval
    heldout = endpoint_heldout(ctx)
    target = probe(cfg)
    if cfg.tasks:
        check_tokenizer(cfg, target)
    out_dir = ctx.stage_dir("eval") / "endpoint"
    tasks_dir = None
    if any(t in LOCAL_TASKS for t in cfg.tasks):
        tasks_dir = write_local_tasks(out_dir / "lm_eval_tasks", heldout.texts if heldout else [],
                                      ctx.recipe.sft.val_fraction)
    log.info("eval: endpoint %s, model %s", target.base, target.model)
    started = time.perf_counter()
    record = evaluate_endpoint(target, cfg, tasks_dir)
    atomic_write_json(out_dir / RESULTS, results_document(cfg, heldout, [record], None))
    metrics = MetricsLog(out_dir, tensorboard=False)
    metrics.log({"model": record["name"], "endpoint": target.base, **task_metrics(record),
                 "seconds": round(time.perf_counter() - started, 2)})
    metrics.close()
    return {"results": str(out_dir / RESULTS)}


def task_metrics(record: dict) -> dict:
    return {f"{task}/{metric}": value for task, values in record.get("lm_eval", {}).get("tasks", {}).items()
            for metric, value in values.items() if isinstance(value, float)}


def evaluate(ctx: StageContext, parallel: bool = True) -> dict:
    """The stage. ``parallel``: one Ray task per model on the cluster (``init_ray``); False: in this process,
    one model after the other (tests, and a machine without Ray)."""
    cfg = ctx.recipe.eval
    if cfg.endpoint:
        return evaluate_endpoint_stage(ctx)
    specs = resolve_models(cfg, ctx.run_dir)
    heldout = load_heldout(cfg.text, ctx.run_dir.root / "data", ctx.recipe.data.tokenize.val_fraction,
                           cfg.text_field, cfg.max_bytes)
    check_tasks(cfg.tasks)
    out_dir = ctx.stage_dir("eval")
    tasks_dir = None
    if any(t in LOCAL_TASKS for t in cfg.tasks):  # on a cluster, the run dir is shared storage: tasks read it
        tasks_dir = str(write_local_tasks(out_dir / "lm_eval_tasks", heldout.texts, ctx.recipe.sft.val_fraction))
    log.info("eval: %d model(s) on %d held-out bytes (%s)", len(specs), heldout.bytes, heldout.source)
    reward_dir = ctx.run_dir.model_dir("reward")
    score_reward = cfg.reward and not cfg.models and (reward_dir / "config.json").is_file()
    reward_args = (str(reward_dir), ctx.recipe.reward, ctx.recipe.seed)
    policies = run_policies(ctx)
    policy_args = (policies, str(reward_dir) if (reward_dir / "config.json").is_file() else None, ctx.recipe)
    if parallel:
        ray = ctx.ray()
        texts = ray.put(heldout.texts)
        task = ray.remote(evaluate_model).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        refs = [task.remote(spec, texts, cfg, tasks_dir) for spec in specs]
        reward_ref = ray.remote(evaluate_reward_model).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus
                                                               ).remote(*reward_args) if score_reward else None
        policy_ref = ray.remote(timed_policies).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus
                                                        ).remote(*policy_args) if policies else None
        outs = ray.get(refs)
        reward = ray.get(reward_ref) if reward_ref is not None else None
        policy = ray.get(policy_ref) if policy_ref is not None else None
    else:
        outs = [evaluate_model(spec, heldout.texts, cfg, tasks_dir) for spec in specs]
        reward = evaluate_reward_model(*reward_args) if score_reward else None
        policy = timed_policies(*policy_args) if policies else None
    atomic_write_json(out_dir / RESULTS, results_document(cfg, heldout, [o["record"] for o in outs],
                                                          reward["record"] if reward else None,
                                                          policy["record"] if policy else None))
    metrics = MetricsLog(out_dir, tensorboard=False)
    for out in outs:
        record = out["record"]
        metrics.log({"model": record["name"], "bits_per_byte": record["bpb"]["bits_per_byte"],
                     "loss": record["bpb"]["loss"], **task_metrics(record), "seconds": out["seconds"], "device": out["device"],
                     "pid": out["pid"]})
    if reward:
        metrics.log({"model": "reward", "reward_accuracy": reward["record"]["accuracy"],
                     "reward_margin": reward["record"]["margin"], "seconds": reward["seconds"], "pid": reward["pid"]})
    if policy:
        for name, row in policy["record"]["models"].items():
            metrics.log({"model": name, **{f"policy/{k}": v for k, v in row.items() if isinstance(v, float)},
                         "seconds": policy["seconds"], "pid": policy["pid"]})
    metrics.close()
    return {"results": str(out_dir / RESULTS),
            **({"reward_accuracy": reward["record"]["accuracy"]} if reward else {}),
            **{f"{o['record']['name']}_bpb": o["record"]["bpb"]["bits_per_byte"] for o in outs}}


def run(ctx: StageContext) -> dict:
    return evaluate(ctx, parallel=True)
