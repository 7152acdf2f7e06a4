"""Model cards: the README.md every Hugging Face export of raylm carries, with the YAML front-matter the Hub and
``huggingface_hub.ModelCard.load`` read (base model, datasets, training stages, license, library, tags and,
when known, eval results as ``model-index``), written by ``huggingface_hub``'s own ``ModelCardData``.

``CardInfo`` is a small frozen dataclass, so it travels to the Ray Train worker or actor that does the export,
and the card lands in the staged directory with the weights (one atomic rename for both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.storage import location

CARD = "README.md"
# the training stages behind each exported model, from scratch
STAGE_CHAIN = {"pretrain": ("pretrain",), "sft": ("pretrain", "sft"), "reward": ("pretrain", "sft", "reward"),
               "ppo": ("pretrain", "sft", "ppo"), "dpo": ("pretrain", "sft", "dpo")}
PARENT = {"sft": "pretrain", "reward": "sft", "ppo": "sft", "dpo": "sft"}
BUILTIN_DATA = {"pretrain": "raylm-builtin: the documentation of the installed Python packages",
                "sft": "raylm-builtin: docstring Q/A chats (pipelines/chat/builtin_qa.py)",
                "reward": "raylm-builtin: preference pairs from the docstring Q/A",
                "ppo": "raylm-builtin: the docstring questions as prompts",
                "dpo": "raylm-builtin: preference pairs from the docstring Q/A"}
SUMMARY = {"pretrain": "a decoder-only language model pretrained from scratch on the corpus",
           "sft": "the pretrained model fine-tuned on chats (loss on the assistant's tokens)",
           "reward": "a scalar reward model (the SFT model with a one-output head) trained on preference pairs",
           "ppo": "the SFT model optimised against the reward with RLHF (PPO or GRPO, KL to the SFT model)",
           "dpo": "the SFT model optimised on preference pairs with DPO (reference: the SFT model)"}


@dataclass(frozen=True, kw_only=True)
class CardInfo:
    stage: str  # pretrain | sft | reward | ppo | dpo
    run: str  # the run directory's name: the model's name on its card
    base_model: str | None = None  # the model this one was trained from (a path); None: from scratch
    datasets: tuple[str, ...] = ()
    eval_results: tuple[dict, ...] = ()  # {"task", "dataset", "dataset_name", "metric", "value"}
    license: str = "unknown"  # the weights follow the terms of the data they were trained on
    extra: tuple[tuple[str, str], ...] = field(default=())  # more "key: value" lines for the body


def card_info(recipe, run_dir: str | Path, stage: str, results: dict | None = None) -> CardInfo:
    """What a stage's export says about itself, from the resolved recipe (and eval/results.json when given)."""
    run = location(run_dir)  # a path, or an object-store URI (cluster.storage)
    given = {"pretrain": list(recipe.data.input), "sft": [recipe.sft.data] if recipe.sft.data else [],
             "reward": [recipe.reward.data] if recipe.reward.data else [],
             "ppo": [recipe.ppo.prompts] if recipe.ppo.prompts else [],
             "dpo": [recipe.dpo.data] if recipe.dpo.data else []}[stage]
    extra = [("algorithm", recipe.ppo.algorithm)] if stage == "ppo" else []
    if stage == "ppo" and recipe.ppo.use_reward_model:
        extra.append(("reward model", str(run / "reward" / "model")))
    return CardInfo(stage=stage, run=run.name, base_model=str(run / PARENT[stage] / "model") if stage in PARENT
                    else None, datasets=tuple(given or [BUILTIN_DATA[stage]]),
                    eval_results=tuple(eval_results(results, stage)) if results else (), extra=tuple(extra))


def eval_results(results: dict, model_name: str) -> list[dict]:
    """One model's numbers of a ``raylm eval`` results.json, as model-index entries."""
    out = []
    for m in results.get("models", []):
        if m["name"] != model_name:
            continue
        held = results.get("heldout", {}).get("source", "held-out text")
        out.append({"task": "text-generation", "dataset": "raylm-heldout", "dataset_name": held,
                    "metric": "bits_per_byte", "value": m["bpb"]["bits_per_byte"]})
        for task, res in (m.get("lm_eval") or {}).get("tasks", {}).items():
            for metric in ("acc", "acc_norm"):
                if isinstance(res.get(metric), (int, float)):
                    out.append({"task": "text-generation", "dataset": task, "dataset_name": task,
                                "metric": metric, "value": res[metric]})
    return out


def render_card(info: CardInfo) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    chain = STAGE_CHAIN[info.stage]
    data = ModelCardData(
        model_name=f"{info.run}-{info.stage}", base_model=info.base_model, datasets=list(info.datasets),
        license=info.license, library_name="transformers", tags=["raylm", "llama", *chain],
        pipeline_tag="text-classification" if info.stage == "reward" else "text-generation",
        eval_results=[EvalResult(task_type=e["task"], dataset_type=e["dataset"], dataset_name=e["dataset_name"],
                                 metric_type=e["metric"], metric_value=e["value"]) for e in info.eval_results]
        or None,
        training_stages=list(chain))
    summary = SUMMARY[info.stage]
    lines = [f"# {info.run}-{info.stage}", "", (f"{summary[0].upper()}{summary[1:]}, made by raylm "
             f"(stages: {' -> '.join(chain)})."), "",
             f"- base model: {info.base_model or 'none (trained from scratch)'}",
             *[f"- dataset: {d}" for d in info.datasets], *[f"- {k}: {v}" for k, v in info.extra],
             f"- license: {info.license} (the weights follow the terms of the data they were trained on)", "",
             ("Where it came from, file by file with sha256: `raylm lineage <this directory>`. How good it is: "
             "`raylm eval --model <this directory>` and the run's report (`raylm report RUN_DIR`)."), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(model_dir: str | Path, info: CardInfo | None) -> Path | None:
    """Write ``README.md`` into an export directory (a staged one: the rename that publishes it is the export's)."""
    if info is None:
        return None
    path = Path(model_dir) / CARD
    path.write_text(render_card(info), encoding="utf-8")
    return path
