"""Learning per second: raylm's default pretraining against a nanoGPT-shape character-level baseline at equal
wall time, both scored in bits per byte on the same held-out text.

    .venv/bin/python benchmarks/pretrain_quality.py                        # the built-in corpus, tiny-cpu recipe
    .venv/bin/python benchmarks/pretrain_quality.py --text input.txt       # any text file: first 90% / last 10%
    .venv/bin/python benchmarks/pretrain_quality.py model.qk_norm=true pretrain.optimizer=adamw
    .venv/bin/python benchmarks/pretrain_quality.py --local            # screening: the engine in this process

raylm: the recipe's BPE tokenizer trained on the training text, the recipe's model and ``pretrain:`` section
through the real engine (Ray Train workers, DeepSpeed), exported to Hugging Face format and scored with
transformers (``pipelines.eval.scoring``, as ``raylm eval`` does). Its training time is the sum of its steps'
``step_s`` (no Ray start-up, evals, checkpoints or export). ``--local`` builds the same DeepSpeed engine
(``build_engine``: model, optimizer, schedule, ZeRO) in this process as one rank with all the threads and the
same global batch, for screening settings where Ray cannot start (on this shared VM the raylet crashed at
load ~65); the figure that counts is the Ray run's.
Baseline: nanoGPT's documented CPU run of ``train_shakespeare_char`` (4 layers, 4 heads, 128 wide, block 64,
batch 12, dropout 0, AdamW lr 1e-3 betas (0.9, 0.99), warm-up 100 iterations, cosine to 1e-4, clip 1), as a
plain PyTorch GPT written below, in one process with as many threads as raylm's workers have in all. It trains
for raylm's training time, its cosine laid over that time (not cut short by it). Its "characters" are UTF-8
bytes (the same as characters on ASCII text, and no unseen symbols in the held-out part).
Both score every held-out document after a newline/EOS context, in non-overlapping windows of their training
length; bits per byte = summed nats / ln 2 / UTF-8 bytes. Prepared text, tokenizer and shards are cached in
``--work-dir`` (keyed by the text and the tokenizer settings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.recipe import load_recipe
from cluster.rundir import read_metrics
from pipelines.data.pack import is_validation, pack
from pipelines.eval.scoring import Window, windows

VAL_FRACTION = 0.1


def builtin_documents(recipe) -> list[str]:
    """The built-in corpus's documents (exact duplicates dropped, e.g. the many copies of one licence)."""
    from pipelines.data.builtin_corpus import extract, list_builtin_files

    cfg = recipe.data.builtin
    seen, docs = set(), []
    for row in list_builtin_files(cfg):
        for text in extract(Path(row["path"]).read_bytes(), row["kind"], row["path"], row["root"], cfg):
            if text.strip() and text not in seen:
                seen.add(text)
                docs.append(text)
    return docs


def split_text(recipe, text_file: str | None) -> tuple[list[str], list[str]]:
    if text_file:  # nanoGPT's split: the first 90% of the file trains, the last 10% is held out
        text = Path(text_file).read_text(encoding="utf-8")
        cut = int(len(text) * (1 - VAL_FRACTION))
        return [text[:cut]], [text[cut:]]
    docs = builtin_documents(recipe)
    ids = [hashlib.sha256(d.encode("utf-8")).hexdigest() for d in docs]
    return ([d for d, i in zip(docs, ids) if not is_validation(i, VAL_FRACTION)],
            [d for d, i in zip(docs, ids) if is_validation(i, VAL_FRACTION)])


def prepare(recipe, text_file: str | None, work_dir: Path) -> tuple[Path, dict, list[str], list[str]]:
    """Split, tokenizer and shards, cached under ``work_dir/<key>``: (shards dir, manifest, train, val)."""
    from pipelines.tokenizer import load_tokenizer, train_tokenizer

    source = str(Path(text_file).resolve()) if text_file else "builtin"
    key_text = json.dumps([source, os.path.getmtime(text_file) if text_file else 0, recipe.tokenizer.vocab_size,
                           recipe.data.tokenize.seq_len, recipe.seed])
    root = work_dir / hashlib.sha256(key_text.encode()).hexdigest()[:16]
    texts = root / "texts.json"
    if texts.is_file():
        train, val = json.loads(texts.read_text())
    else:
        train, val = split_text(recipe, text_file)
        root.mkdir(parents=True, exist_ok=True)
        texts.write_text(json.dumps([train, val]))
    shards = root / "shards"
    if (shards / "manifest.json").is_file():
        return shards, json.loads((shards / "manifest.json").read_text()), train, val
    tok_dir = root / "tokenizer"
    tok = train_tokenizer(iter(train), tok_dir, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency) \
        if not (tok_dir / "tokenizer.json").is_file() else load_tokenizer(tok_dir)
    seq_len = recipe.data.tokenize.seq_len
    shards.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, docs in (("train", train), ("validation", val)):
        rows, _, _ = pack(tok(docs, add_special_tokens=False)["input_ids"], tok.eos_token_id, seq_len)
        pq.write_table(pa.table({"input_ids": pa.array(list(rows), type=pa.list_(pa.int32()))}),
                       shards / f"{split}-00000.parquet")
        splits[split] = {"files": [f"{split}-00000.parquet"], "sequences": len(rows), "tokens": int(rows.size)}
    counts = np.bincount(pq.read_table(shards / "train-00000.parquet").column("input_ids").combine_chunks()
                         .values.to_numpy(), minlength=len(tok))
    probs = counts[counts > 0] / counts.sum()
    manifest = {"seq_len": seq_len, "vocab_size": recipe.tokenizer.vocab_size, "tokenizer_dir": str(tok_dir),
                "eos_id": tok.eos_token_id, "unigram_entropy_nats": float(-(probs * np.log(probs)).sum()),
                "splits": splits}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, manifest, train, val


def cap(texts: list[str], max_bytes: int) -> list[str]:
    from pipelines.eval.heldout import cap_bytes

    return cap_bytes(texts, max_bytes)[0]


def run_raylm(recipe, shards: Path, manifest: dict, stage_dir: Path, val: list[str]) -> dict:
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.runtime import init_ray
    from pipelines.eval.scoring import bits_per_byte
    from pipelines.pretrain.task import pretrain_task
    from pipelines.train.engine import fit

    task = pretrain_task(recipe.model, recipe.pretrain, manifest, shards, recipe.seed)
    init_ray(recipe.ray)
    t0 = time.perf_counter()
    fit(task, recipe.pretrain, stage_dir, seed=recipe.seed, export_dir=stage_dir / "model")
    wall = time.perf_counter() - t0
    ray.shutdown()  # the baseline gets the machine to itself, as raylm's workers had it
    metrics = read_metrics(stage_dir)
    train_s = sum(r["step_s"] for r in metrics)
    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stage_dir / "model")
    score = bits_per_byte(model, tok, val, manifest["seq_len"] - 1, 16, "raylm")
    return {"bits_per_byte": score["bits_per_byte"], "train_s": round(train_s, 1), "fit_wall_s": round(wall, 1),
            "steps": len(metrics), "tokens": int(sum(r["tokens_per_s"] * r["step_s"] for r in metrics)),
            "final_loss": metrics[-1]["loss"], "bytes_per_token": round(1 / score["tokens_per_byte"], 3),
            "model_class": model.__class__.__name__}


def run_raylm_local(recipe, shards: Path, manifest: dict, out_dir: Path, val: list[str]) -> dict:
    import dataclasses

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.eval.scoring import bits_per_byte
    from pipelines.hf_export import export_hf
    from pipelines.pretrain.task import pretrain_task
    from pipelines.train.builder import build_engine
    from pipelines.train.data import BatchStream
    from pipelines.train.loop import seed_everything, train_step
    from pipelines.train.shm import skip_cpu_shm_comm_build

    cfg = recipe.pretrain
    one = dataclasses.replace(cfg, num_workers=1, micro_batch_size=cfg.micro_batch_size * cfg.num_workers)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{out_dir.parent / 'dist-store'}", rank=0, world_size=1)
    skip_cpu_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(cfg.num_workers * cfg.cpus_per_worker)
    seed_everything(recipe.seed)
    task = pretrain_task(recipe.model, one, manifest, shards, recipe.seed)
    engine = build_engine(task, one, world_size=1, pipeline_stages=1)
    stream = BatchStream(task, "train", 0, 1, engine.device)
    train_s, loss, cpu0 = 0.0, float("nan"), time.process_time()
    for step in range(1, one.max_steps + 1):
        t0 = time.perf_counter()
        loss, _ = train_step(engine, task, stream, one, pipeline=False)
        train_s += time.perf_counter() - t0
        if step % 50 == 0:
            print(f"  raylm (local) step {step}: loss {loss:.3f}, {train_s:.0f}s", flush=True)
    export_hf(engine.module.state_dict(), recipe.model, manifest["vocab_size"], manifest["tokenizer_dir"], out_dir)
    dist.destroy_process_group()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    score = bits_per_byte(model, AutoTokenizer.from_pretrained(out_dir), val, manifest["seq_len"] - 1, 16, "raylm")
    return {"bits_per_byte": score["bits_per_byte"], "train_s": round(train_s, 1), "steps": one.max_steps,
            "tokens": stream.tokens, "final_loss": round(loss, 4), "engine": "local (1 rank)",
            "train_cpu_s": round(time.process_time() - cpu0, 1),
            "bytes_per_token": round(1 / score["tokens_per_byte"], 3), "model_class": model.__class__.__name__}


class NanoGPT(nn.Module):
    """nanoGPT's GPT (bias=False, dropout 0): learned positions, pre-LayerNorm blocks, GELU MLP 4x, tied head."""

    def __init__(self, vocab: int, block: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128):
        super().__init__()
        self.n_head, self.block = n_head, block
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(n_embd, bias=False), "c_attn": nn.Linear(n_embd, 3 * n_embd, bias=False),
            "attn_proj": nn.Linear(n_embd, n_embd, bias=False), "ln_2": nn.LayerNorm(n_embd, bias=False),
            "c_fc": nn.Linear(n_embd, 4 * n_embd, bias=False), "mlp_proj": nn.Linear(4 * n_embd, n_embd, bias=False),
        }) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        gen = torch.Generator().manual_seed(1337)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                with torch.no_grad():
                    p.copy_(torch.empty(p.shape).normal_(0, std, generator=gen))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["attn_proj"](y)
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


def run_baseline(train: list[str], val: list[str], budget_s: float, threads: int, seed: int) -> dict:
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray("\n\n".join(train).encode("utf-8")), dtype=torch.uint8).long()
    model = NanoGPT(256, block)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    elapsed, iters = 0.0, 0
    while elapsed < budget_s:
        t0 = time.perf_counter()
        progress = min(1.0, elapsed / budget_s)  # cosine over the time budget (nanoGPT's is over iterations)
        rate = lr * (iters + 1) / warmup if iters < warmup else min_lr + 0.5 * (lr - min_lr) * (
            1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = rate
        ix = torch.randint(len(data) - block - 1, (batch,))
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        iters += 1
        elapsed += time.perf_counter() - t0
    model.eval()
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in val:
            raw = list(text.encode("utf-8"))
            n_bytes += len(raw)
            todo: list[Window] = windows(raw, ord("\n"), block)
            for w in todo:
                logits = model(torch.tensor([w.inputs]))[0][:len(w.targets)]  # a text's last input has no target
                nll += float(F.cross_entropy(logits, torch.tensor(w.targets), reduction="sum"))
    return {"bits_per_byte": round(nll / math.log(2) / n_bytes, 5), "iterations": iters, "train_s": round(elapsed, 1),
            "final_loss": round(float(loss.detach()), 4)}


def run_baseline_fresh(*args) -> dict:
    """``run_baseline`` in a fresh interpreter. In the process that had just driven the Ray fit the baseline's
    iterations took 1.6 s each instead of 29 ms (61 iterations in 98 s): its threads competed with what the fit
    left behind. A new process starts as clean as raylm's workers did."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_baseline, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="recipe (default configs/tiny-cpu.yaml)")
    parser.add_argument("--text", help="a UTF-8 text file instead of the built-in corpus")
    parser.add_argument("--local", action="store_true", help="screening: raylm's engine in this process, no Ray")
    parser.add_argument("--no-baseline", action="store_true",
                        help="raylm's bits per byte only (comparing raylm settings at equal steps)")
    parser.add_argument("--max-val-bytes", type=int, default=131072, help="held-out bytes scored")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "raylm" / "pretrain_quality")
    parser.add_argument("overrides", nargs="*", help="recipe overrides KEY=VALUE")
    args = parser.parse_args()
    recipe = load_recipe(args.config, list(args.overrides))
    cfg = recipe.pretrain
    # Evals and checkpoints cost wall time outside the steps; once at the end is enough here.
    recipe = load_recipe(args.config, [f"pretrain.eval_every={cfg.max_steps}",
                                       f"pretrain.checkpoint_every={cfg.max_steps}", *args.overrides])
    load_before = os.getloadavg()[0]
    shards, manifest, train, val = prepare(recipe, args.text, args.work_dir)
    val = cap(val, args.max_val_bytes)
    print(f"text: {args.text or 'built-in corpus'}: {sum(len(t.encode()) for t in train):,} training bytes, "
          f"{sum(len(t.encode()) for t in val):,} held-out bytes scored", flush=True)
    with tempfile.TemporaryDirectory(prefix="raylm-quality-") as tmp:
        run = run_raylm_local if args.local else run_raylm
        ours = run(recipe, shards, manifest, Path(tmp) / "pretrain", val)
    print(f"raylm: {ours['bits_per_byte']:.4f} bits/byte after {ours['train_s']:.0f}s of training", flush=True)
    if args.no_baseline:
        print(json.dumps({"load_average_before": round(load_before, 1), "overrides": args.overrides, "raylm": ours}))
        return
    base = run_baseline_fresh(train, val, ours["train_s"], cfg.num_workers * cfg.cpus_per_worker, recipe.seed)
    ratio = ours["bits_per_byte"] / base["bits_per_byte"]
    print(f"nanoGPT-shape char baseline: {base['bits_per_byte']:.4f} bits/byte after {base['train_s']:.0f}s")
    print(json.dumps({"load_average_before": round(load_before, 1), "overrides": args.overrides, "raylm": ours,
                      "baseline": base, "ratio": round(ratio, 4)}, indent=2))
    print(f"ratio raylm / baseline bits per byte at equal training time: {ratio:.3f}x (target <= 0.85x)")


if __name__ == "__main__":
    main()
