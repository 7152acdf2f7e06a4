"""Everything measured on one model, in one process (a Ray task per model when on a cluster)."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.schemas.eval import EvalConfig
from pipelines.eval.scoring import bits_per_byte, greedy_samples

log = logging.getLogger("raylm")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # "pretrain", "sft", "ppo" for a run's models; the directory's name for --model
    path: str
    chat: bool  # samples through the chat template (sft/ppo) or as plain text continuation (pretrain)


def check_model_dir(path: Path) -> None:
    """Fails (naming the file) unless ``path`` looks like a loadable HF causal-LM directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing (not a Hugging Face model directory)")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise FileNotFoundError(f"{path}: no weights (*.safetensors / *.bin)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json)")


def weights_sha256(path: Path) -> str:
    """One digest over every weight file (name + content, in name order): identifies the exact model."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pick_device(cfg: EvalConfig):
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_model(path: str, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def evaluate_model(spec: ModelSpec, texts: list[str], cfg: EvalConfig, tasks_dir: str | None = None) -> dict:
    """bits per byte on ``texts``, greedy samples of ``cfg.prompts`` and the lm-eval ``cfg.tasks`` (the local
    ones written to ``tasks_dir``).

    Returns {"record": the model's entry of results.json, "seconds", "device", "pid"}: timings and placement go to
    metrics.jsonl only, never into results.json, which a rerun on the same inputs must reproduce exactly."""
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    device = pick_device(cfg)
    model, tokenizer = load_model(spec.path, device)
    seq_len = min(cfg.seq_len or 10**9, model.config.max_position_embeddings)
    record = {
        "name": spec.name, "path": spec.path, "weights_sha256": weights_sha256(Path(spec.path)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bpb": bits_per_byte(model, tokenizer, texts, seq_len, cfg.batch_size, spec.path),
        "samples": {"format": "chat" if spec.chat else "text",
                    "items": greedy_samples(model, tokenizer, cfg.prompts, spec.chat, cfg.max_new_tokens)},
    }
    if cfg.tasks:
        from pipelines.eval.lm_tasks import run_tasks

        record["lm_eval"] = run_tasks(model, tokenizer, cfg.tasks, Path(tasks_dir) if tasks_dir else None,
                                      spec.chat, cfg.batch_size, cfg.task_limit)
    log.info("eval: %s: %.4f bits/byte", spec.name, record["bpb"]["bits_per_byte"])
    return {"record": record, "seconds": round(time.perf_counter() - started, 2), "device": str(device),
            "pid": os.getpid()}
