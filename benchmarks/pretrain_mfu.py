"""MFU of a recipe's pretraining through the real `raylm pretrain` path (Ray Train + DeepSpeed), on GPUs.

Shards are synthetic (uniform random tokens in the recipe's vocabulary, packed to its seq_len): throughput does
not depend on token values, and this keeps the measurement independent of the data stage. The baseline is the
same model trained by a plain single-process PyTorch loop (bf16 autocast, torch AdamW) on the same GPU, same
micro-batch, measured in the same run: the ratio shows what Ray Train + DeepSpeed costs or gains.

    python benchmarks/pretrain_mfu.py -c configs/gpt-125m-gpu.yaml --steps 60 pretrain.num_workers=1
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster.cli import main as raylm
from cluster.config import atomic_write_json
from cluster.recipe import load_recipe
from cluster.rundir import read_metrics
from pipelines.model import build_model, flops_per_token
from pipelines.tokenizer import train_tokenizer
from pipelines.train.flops import peak_flops


def write_synthetic_shards(run_dir: Path, vocab_size: int, seq_len: int, sequences: int, seed: int = 0) -> None:
    shards = run_dir / "data" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / "data" / "tokenizer"
    train_tokenizer((f"sample text number {i} for the tokenizer files" for i in range(200)), tok_dir,
                    vocab_size=vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", sequences), ("validation", max(8, sequences // 50))):
        ids = rng.integers(3, vocab_size, size=(n, seq_len), dtype=np.int32)
        table = pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
                          "doc_starts": pa.array([[0]] * n, type=pa.list_(pa.int32()))})
        name = f"{split}-00000.parquet"
        pq.write_table(table, shards / name)
        splits[split] = {"files": [name], "sequences": n, "tokens": n * seq_len}
    atomic_write_json(shards / "manifest.json", {
        "seq_len": seq_len, "vocab_size": vocab_size, "tokenizer_dir": str(tok_dir), "tokenizer_hash": "synthetic",
        "eos_id": 2, "unigram_entropy_nats": float(np.log(vocab_size)), "splits": splits})


def plain_torch_tokens_per_s(recipe, vocab_size: int, steps: int) -> float:
    """Baseline: one process, the same model and micro-batch, bf16 autocast, fused torch AdamW; compiled with
    torch.compile when the recipe compiles raylm's model (compiled against compiled, never against eager)."""
    device = torch.device("cuda")
    model = build_model(recipe.model, vocab_size, seed=0).to(device)
    if recipe.pretrain.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain.lr, fused=True)
    b, t = recipe.pretrain.micro_batch_size, recipe.data.tokenize.seq_len - 1
    x = torch.randint(0, vocab_size, (b, t + 1), device=device)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(recipe.pretrain.grad_accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x[:, :-1], x[:, 1:])  # the loss inside forward, as raylm's pretraining calls it
            (loss / recipe.pretrain.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.pretrain.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[steps // 3:])
    return b * t * recipe.pretrain.grad_accum / step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/gpt-125m-gpu.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sequences", type=int, default=4096)
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the plain PyTorch loop (--no-baseline: raylm's MFU only, for quick sweeps)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [f"pretrain.max_steps={args.steps}", "pretrain.warmup_steps=5", "pretrain.eval_every=1000000",
                 f"pretrain.checkpoint_every={args.steps}", *args.overrides]
    recipe = load_recipe(args.config, overrides)
    vocab = recipe.tokenizer.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        write_synthetic_shards(run_dir, vocab, recipe.data.tokenize.seq_len, args.sequences)
        rc = raylm(["pretrain", "-c", args.config, "--run-dir", str(run_dir), *overrides])
        if rc:
            raise SystemExit(f"raylm pretrain failed with exit code {rc}")
        steps = [m for m in read_metrics(run_dir / "pretrain") if "tokens_per_s" in m]
    tail = steps[len(steps) // 3:]
    raylm_tps = statistics.median(m["tokens_per_s"] for m in tail)  # tokens/s over all workers
    workers = recipe.pretrain.num_workers
    fpt = flops_per_token(recipe.model, vocab, recipe.data.tokenize.seq_len - 1)
    peak = peak_flops(torch.device("cuda"))
    result = {
        "gpu": torch.cuda.get_device_name(), "workers": workers, "recipe": recipe.name, "overrides": args.overrides,
        "raylm_tokens_per_s": round(raylm_tps), "raylm_mfu": round(fpt * raylm_tps / (peak * workers), 4),
    }
    if args.baseline:
        base_tps = plain_torch_tokens_per_s(recipe, vocab, min(args.steps, 40))
        result.update({"plain_torch_tokens_per_s_1gpu": round(base_tps),
                       "plain_torch_mfu": round(fpt * base_tps / peak, 4),
                       "ratio_raylm_per_gpu_vs_plain_torch": round(raylm_tps / workers / base_tps, 3)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
