"""raylm's command line grammar: the parser and the stage table, shared by the CLI (``cluster.cli``) and by
``raylm submit`` (``cluster.jobs``), which parses a command with it before sending it to a cluster."""
from __future__ import annotations

import argparse

from cluster.recipe import DEFAULT_RECIPE
from cluster.upload import DEFAULT_LIMIT_MB

# stage -> (module:function, help). Each function takes a StageContext and returns a summary dict.
STAGE_ENTRYPOINTS = {
    "data": ("pipelines.data.stage:run", "stream, clean, filter, dedupe, tokenize and pack the corpus"),
    "pretrain": ("pipelines.pretrain.stage:run", "pretrain the model with Ray Train + DeepSpeed"),
    "sft": ("pipelines.sft.stage:run", "supervised fine-tuning on chat data"),
    "reward": ("pipelines.reward.stage:run", "train the pairwise reward model"),
    "ppo": ("actors.ppo.stage:run", "PPO/GRPO with policy, critic, reward and reference Ray actors"),
    "dpo": ("actors.dpo.stage:run", "DPO on preference pairs, reference log-probs from Ray actors"),
    "eval": ("pipelines.eval.stage:run", "bits per byte, lm-eval tasks, samples and reward accuracy of the models"),
    "report": ("pipelines.report.stage:run", ("the run's report: one self-contained HTML page (plots) and a "
               "markdown twin, from what the run directory holds")),
    "serve": ("serve.stage:run", "serve the model: OpenAI-compatible API + Gradio chat demo"),
}

# The stages each recipe `alignment` replaces the other's with in `raylm run`'s default stage list.
ALIGNMENT_STAGES = {"ppo": ("reward", "ppo"), "dpo": ("dpo",)}


def default_stages(alignment: str, from_model: bool = False, eval_text: bool = True) -> list[str]:
    """`raylm run` without --stages: every stage, aligning the SFT model with PPO/GRPO or with DPO. Started from
    a model of the user's (``from_model``: sft.base_model), data and pretrain are skipped, and eval runs only
    when it has held-out text to score (``eval_text``: eval.text)."""
    skipped = {s for name, stages in ALIGNMENT_STAGES.items() if name != alignment for s in stages}
    if from_model:
        skipped |= {"data", "pretrain"} | (set() if eval_text else {"eval"})
    return [s for s in STAGE_ENTRYPOINTS if s not in skipped]


# Flags of the commands above whose values are paths: `raylm submit` makes them portable.
PATH_FLAGS = ("-c", "--config", "--run-dir", "--input", "--data", "--model", "--out", "--text", "--tokenizer")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=str(DEFAULT_RECIPE), metavar="RECIPE",
                   help="YAML recipe (default: configs/tiny-cpu.yaml)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory: a filesystem path, or an s3:// / gs:// URI for data and pretrain "
                   "(default: runs/<recipe name>)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--ray-logs", action="store_true",
                   help="show Ray's own logs (Ray Data progress, worker output) here instead of <run-dir>/logs/ "
                        "(also: RAYLM_RAY_LOGS=1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides, e.g. pretrain.zero_stage=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="raylm: a raw corpus to a served chat model, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline (or --stages) and leave the chat demo up")
    _common(p)
    p.add_argument("--stages", help="comma-separated stages to run, in order (default: every stage, with "
                   "reward,ppo or dpo as the recipe's `alignment` says; with --model or sft.base_model: no data "
                   "and pretrain, and eval only when eval.text names held-out text)")
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="start from this Hugging Face causal LM "
                   "(sft.base_model) instead of data + pretrain")
    p.add_argument("--no-block", action="store_true", help="with serve: return once the app is up")
    for stage, (_, text) in STAGE_ENTRYPOINTS.items():
        p = sub.add_parser(stage, help=text, description=text)
        _common(p)
        if stage == "data":
            p.add_argument("--input", action="append", metavar="PATH", help="corpus file/dir/URI (repeatable)")
        if stage in ("sft", "reward", "ppo", "dpo"):
            p.add_argument("--data", metavar="PATH", help="replaces the stage's built-in data")
            p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="start from this Hugging Face causal LM "
                           "instead of the run's previous stage")
        if stage == "eval":
            p.add_argument("--model", action="append", metavar="DIR", help="HF model dir (repeatable; default: "
                           "every model of the run); lm-eval tasks: eval.tasks=[NAME,...]")
            p.add_argument("--text", action="append", metavar="PATH", help="held-out text file/dir (repeatable; "
                           "default: the data stage's validation split)")
            p.add_argument("--endpoint", metavar="URL", help="evaluate a live OpenAI-compatible endpoint (base URL "
                           "ending in /v1) instead of model dirs; --model NAME picks its served model")
            p.add_argument("--api-key-env", metavar="VAR", help="with --endpoint: the environment variable holding "
                           "its API key (default OPENAI_API_KEY)")
            p.add_argument("--tokenizer", metavar="DIR", help="with --endpoint: the served model's HF tokenizer "
                           "(default: the endpoint's /tokenize)")
        if stage == "report":
            p.usage = "raylm report [-h] [RUN_DIR] [-c RECIPE] [--run-dir DIR]"
            p.epilog = ("RUN_DIR (or --run-dir; default runs/<recipe name>) gets report/report.html and report.md; "
                        "no Ray is started")
        if stage == "serve":
            p.add_argument("--model", help="HF model dir (default: the run's latest trained model)")
            p.add_argument("--host")
            p.add_argument("--port", type=int)
            p.add_argument("--no-block", action="store_true", help="return once the app is up")
    p = sub.add_parser("submit", help="submit a raylm command to a Ray cluster as a job (Ray Jobs API)")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--env", action="append", default=[], metavar="K[=V]",
                   help="environment variable for the job; K alone: its value on this machine (repeatable)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="environment variables for the job from a dotenv file here (repeatable)")
    p.add_argument("--cluster-env", action="append", default=[], metavar="K[=NODE_VAR]",
                   help="K takes NODE_VAR's (default K's) value from the cluster nodes' environment: secrets "
                        "stay off the Jobs API (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be uploaded and run, contact no cluster")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_LIMIT_MB,
                   help=f"refuse to upload a checkout larger than this (default {DEFAULT_LIMIT_MB})")
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
    return parser
