"""lm-evaluation-harness on a model of the run: the local tasks shipped in ``tasks/`` and any task name lm-eval
knows (hub tasks need a machine that reaches the hub).

The shipped task YAMLs read local JSON-lines files (``dataset_path: json``): ``write_local_tasks`` builds those
files from data on the machine and writes the YAMLs next to them with absolute ``data_files``, into a directory
lm-eval scans with ``include_path`` (``lm_eval --include_path DIR`` reads it as well).
"""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import yaml

from cluster.config import atomic_write_text

SHIPPED = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = tuple(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
CHOICES = 4


def qa_multiple_choice(val_fraction: float) -> list[dict]:
    """SFT's held-out questions, each with its true answer and three other functions' answers, in a fixed
    per-question order (the same file on every run)."""
    from pipelines.chat.builtin_qa import builtin_pairs, split_pairs

    pairs = builtin_pairs()
    _, held = split_pairs(pairs, val_fraction)
    answers = sorted({p.answer for p in pairs})
    docs = []
    for pair in held:
        rng = random.Random(zlib.crc32(pair.question.encode()))
        module = pair.name.rsplit(".", 1)[0]
        same = sorted({p.answer for p in pairs if p.name.startswith(module + ".") and p.answer != pair.answer})
        others = [a for a in answers if a != pair.answer and a not in same]
        wrong = rng.sample(same, min(len(same), CHOICES - 1))
        wrong += rng.sample(others, CHOICES - 1 - len(wrong))
        choices = [pair.answer, *wrong]
        rng.shuffle(choices)
        docs.append({"question": pair.question, "choices": choices, "label": choices.index(pair.answer)})
    return docs


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_local_tasks(out_dir: Path, heldout_texts: list[str], sft_val_fraction: float) -> Path:
    """The shipped tasks with their data, under ``out_dir``; returns the directory for ``include_path``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"raylm_qa_mc": qa_multiple_choice(sft_val_fraction),
            "raylm_heldout": [{"text": t} for t in heldout_texts]}
    for name in LOCAL_TASKS:
        config = yaml.safe_load((SHIPPED / f"{name}.yaml").read_text(encoding="utf-8"))
        data_file = out_dir / config["dataset_kwargs"]["data_files"]["test"]
        atomic_write_text(data_file, _jsonl(data[name]))
        config["dataset_kwargs"]["data_files"]["test"] = str(data_file)
        atomic_write_text(out_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out_dir


def task_manager(include_path: Path | None, names: list[str]):
    """lm-eval's index of tasks: ours, plus its own ~10k task YAMLs only when a name needs them (indexing them
    took 35 s on the 2-core machine)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None,
                       include_defaults=any(n not in LOCAL_TASKS for n in names))


def check_tasks(names: list[str]) -> None:
    """Unknown task names fail here, before any model loads (lm-eval indexes its ~10k task YAMLs: seconds)."""
    if not names:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("eval.tasks: needs the lm-eval package (pip install lm-eval)") from None
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        known = set(task_manager(None, unknown).all_tasks)
        missing = [n for n in unknown if n not in known]
        if missing:
            raise ValueError(f"eval.tasks: unknown lm-eval task {missing[0]!r} (local tasks: "
                             f"{', '.join(LOCAL_TASKS)}; others: `lm_eval ls tasks`)")


def _plain(value):
    """lm-eval's result values as JSON: floats rounded (reruns on other thread counts agree), 'N/A' kept."""
    if isinstance(value, float):
        return round(value, 5)
    return value if isinstance(value, (int, str, bool)) or value is None else str(value)


def run_tasks(model, tokenizer, names: list[str], include_path: Path, chat: bool, batch_size: int,
              limit: int | None) -> dict:
    """``lm_eval.simple_evaluate`` with the ``hf`` model type over the already loaded model."""
    from lm_eval.models.huggingface import HFLM

    # Documents start after EOS, as in our bits per byte (scoring.py): lm-eval's default is BOS.
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix,
              max_length=model.config.max_position_embeddings)
    return evaluate_lm(lm, names, include_path, chat, limit)


def evaluate_lm(lm, names: list[str], include_path: Path | None, chat: bool, limit: int | None) -> dict:
    """``lm_eval.simple_evaluate`` over any lm-eval model object (``hf`` in process, ``local-completions`` for an
    endpoint): {task: {metric: value}} plus the settings that change the numbers."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager(include_path, names), limit=limit,
                          apply_chat_template=chat, bootstrap_iters=1000, log_samples=False, verbosity="WARNING")
    results = {task: {k.replace(",none", ""): _plain(v) for k, v in sorted(metrics.items()) if k != "alias"}
               for task, metrics in sorted(out["results"].items())}
    return {"tasks": results, "versions": {t: _plain(v) for t, v in sorted(out.get("versions", {}).items())},
            "n_samples": {t: v.get("effective") for t, v in sorted(out.get("n-samples", {}).items())},
            "chat_template": chat, "limit": limit, "lm_eval_version": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
