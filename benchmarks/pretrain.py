"""Pretraining throughput: raylm (Ray Train + DeepSpeed) against a plain single-process PyTorch loop.

Same model (the recipe's), same token data (random ids in the shard format), same global batch per optimizer
step, same total threads (workers x cpus_per_worker for raylm; torch.set_num_threads(that) for the baseline),
measured in the same run. Prints tokens/s (median over steady-state steps) and the ratio raylm / baseline for
ZeRO-2 data parallel and for 2-stage pipeline parallel (ZeRO-1, untied embeddings), and on request for the
scaling curve: 1 worker, ZeRO-1/2/3 on 2 workers, and 2 simulated nodes (``ray.cluster_utils.Cluster``, one
1-CPU node per worker, STRICT_SPREAD).

    .venv/bin/python benchmarks/pretrain.py                 # tiny-cpu recipe, 30 steps each
    .venv/bin/python benchmarks/pretrain.py --steps 50 -c configs/tiny-cpu.yaml model.dim=256
    .venv/bin/python benchmarks/pretrain.py --variants workers1,zero1,zero2,zero3,nodes2   # the scaling curve

GPU MFU of a recipe through the same Ray Train path: ``benchmarks/pretrain_mfu.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.recipe import load_recipe
from cluster.rundir import read_metrics
from pipelines.model import build_model
from pipelines.pretrain.shards import ShardBatches
from pipelines.pretrain.task import pretrain_task
from pipelines.train.schedule import warmup_cosine

WARMUP_STEPS = 5  # excluded from the medians (allocator, BLAS and gloo warm-up)


def write_random_shards(shards: Path, seq_len: int, vocab_size: int, rows: int) -> dict:
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", rows), ("validation", 64)):
        data = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.array(list(data), type=pa.list_(pa.int32()))}),
                       shards / f"{split}-00000.parquet")
        splits[split] = {"files": [f"{split}-00000.parquet"], "sequences": n, "tokens": n * seq_len}
    manifest = {"seq_len": seq_len, "vocab_size": vocab_size, "tokenizer_dir": str(shards), "tokenizer_hash": "",
                "eos_id": 0, "unigram_entropy_nats": float(np.log(vocab_size)), "splits": splits}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def plain_torch_tokens_per_s(recipe, manifest: dict, shards: Path, steps: int, threads: int,
                             micro_batch: int) -> float:
    """The baseline: one process, the same global batch per step (micro_batch x grad_accum x data-parallel
    workers), taken ``micro_batch`` sequences at a time: its own best split, whatever raylm's micro-batch is."""
    cfg = recipe.pretrain
    torch.set_num_threads(threads)
    model = build_model(recipe.model, manifest["vocab_size"], recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * cfg.num_workers // max(1, cfg.pipeline_stages)
    if global_batch % micro_batch:
        raise ValueError(f"baseline micro-batch {micro_batch} does not divide the global batch {global_batch}")
    accum = global_batch // micro_batch
    stream = iter(ShardBatches(shards, micro_batch, recipe.seed)("train", 0, 1, 0))
    speeds = []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(accum):
            inputs, labels = next(stream)
            (model(inputs, labels) / accum).backward()
            tokens += inputs.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= WARMUP_STEPS:
            speeds.append(tokens / (time.perf_counter() - t0))
    return statistics.median(speeds)


def raylm_tokens_per_s(recipe, manifest: dict, shards: Path, stage_dir: Path, nodes: int = 1) -> tuple[float, float]:
    import ray

    from cluster.runtime import init_ray, project_runtime_env
    from pipelines.train.engine import fit

    task = pretrain_task(recipe.model, recipe.pretrain, manifest, shards, recipe.seed)
    cluster = None
    if nodes == 1:
        init_ray(recipe.ray)
    else:  # simulated nodes: a head with no CPUs and one raylet per worker, on this machine
        from ray.cluster_utils import Cluster

        ray.shutdown()  # the previous variant's cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(nodes):
            cluster.add_node(num_cpus=recipe.pretrain.cpus_per_worker)
        ray.init(address=cluster.address, runtime_env=project_runtime_env())
    t0 = time.perf_counter()
    try:
        fit(task, recipe.pretrain, stage_dir, seed=recipe.seed, pipeline_stages=recipe.pretrain.pipeline_stages)
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    wall = time.perf_counter() - t0
    speeds = [r["tokens_per_s"] for r in read_metrics(stage_dir) if r["step"] > WARMUP_STEPS]
    return statistics.median(speeds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default="zero2,pipeline2",
                        help="comma-separated: zero2, pipeline2, workers1, zero1, zero3, nodes2")
    parser.add_argument("--repeats", type=int, default=1,
                        help="paired runs (baseline then raylm) per variant; the median ratio is the result. On a "
                             "shared 2-core VM one pair's ratio varied 0.79-1.06x (docs/pretrain.md)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = [f"pretrain.max_steps={args.steps}", "pretrain.warmup_steps=2", f"pretrain.eval_every={args.steps}",
              f"pretrain.checkpoint_every={args.steps}", "pretrain.eval_batches=1"]
    # name -> (overrides, the baseline's micro-batch). The baseline takes the same global batch per step as raylm
    # in micro-batches of its own: 16 sequences at once for zero2 (8 per worker x 2 workers), 4 for pipeline2 (on
    # 2 threads 4 and 8 were its fastest splits, 2 and 16 slower), fixed so a raylm recipe change cannot weaken it.
    two = ["pretrain.num_workers=2"]
    variants = {"zero2": (two + ["pretrain.zero_stage=2"], 16),
                # A 2-stage pipeline idles each stage for about one micro-batch per step (fill and drain): 16
                # micro-batches of 2 make that 1/17 of the step, where 4 of 4 made it 1/5. The global batch is
                # 32 sequences (2 x 16), so the bubble is amortized over more work; the baseline takes 32 too.
                "pipeline2": (two + ["pretrain.zero_stage=1", "pretrain.pipeline_stages=2", "model.tie_embeddings=false",
                               "pretrain.micro_batch_size=2", "pretrain.grad_accum=16"], 4),
                # The scaling curve: the baseline gets as many threads as raylm's workers have CPUs in all.
                "workers1": (["pretrain.num_workers=1", "pretrain.zero_stage=2"], 8),
                "zero1": (two + ["pretrain.zero_stage=1"], 16),
                "zero3": (two + ["pretrain.zero_stage=3"], 16),
                "nodes2": (two + ["pretrain.zero_stage=2", "pretrain.placement_strategy=STRICT_SPREAD"], 16)}
    load_before = os.getloadavg()[0]  # before our own processes add to it
    chosen = [name for name in variants if name in args.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        prepared = {}  # name -> (recipe, base_micro, shards, manifest): shards written once, reused by every repeat
        for name in chosen:
            extra, base_micro = variants[name]
            recipe = load_recipe(args.config, common + extra + list(args.overrides))
            cfg = recipe.pretrain
            rows = 2 * args.steps * cfg.micro_batch_size * cfg.grad_accum * cfg.num_workers
            shards = Path(tmp) / name / "data" / "shards"
            manifest = write_random_shards(shards, recipe.data.tokenize.seq_len, recipe.tokenizer.vocab_size, rows)
            prepared[name] = (recipe, base_micro, shards, manifest)
        results = {name: {"micro_batch": p[0].pretrain.micro_batch_size, "grad_accum": p[0].pretrain.grad_accum,
                          "baseline_micro_batch": p[1], "runs": []} for name, p in prepared.items()}
        for repeat in range(args.repeats):
            for name, (recipe, base_micro, shards, manifest) in prepared.items():
                threads = recipe.pretrain.num_workers * recipe.pretrain.cpus_per_worker
                base = plain_torch_tokens_per_s(recipe, manifest, shards, args.steps, threads, base_micro)
                ours, wall = raylm_tokens_per_s(recipe, manifest, shards, Path(tmp) / name / f"pretrain-{repeat}",
                                                nodes=2 if name == "nodes2" else 1)
                results[name]["runs"].append({"raylm_tokens_per_s": round(ours), "plain_torch_tokens_per_s": round(base),
                                              "ratio": round(ours / base, 3), "raylm_wall_s": round(wall, 1)})
                print(f"{name} (run {repeat + 1}/{args.repeats}): raylm {ours:,.0f} tok/s vs plain PyTorch 1 process"
                      f" x {threads} threads {base:,.0f} tok/s -> ratio {ours / base:.2f}x (raylm fit wall {wall:.0f}s"
                      " incl. Ray start-up)", flush=True)
        for name, result in results.items():
            result["median_ratio"] = statistics.median(r["ratio"] for r in result["runs"])
            print(f"{name}: median ratio {result['median_ratio']:.2f}x over {len(result['runs'])} paired run(s)")
        print(json.dumps({"load_average_before": round(load_before, 1), **results}, indent=2))
        if load_before > (os.cpu_count() or 1) / 2:
            # A multi-threaded process whose threads wait for each other at every op suffers far more from
            # other jobs than single-threaded workers do: on a busy machine the ratio flatters raylm.
            print(f"warning: load average {load_before:.1f} before the benchmark started: other jobs were "
                  "running, the ratio is not trustworthy; rerun on an idle machine", flush=True)


if __name__ == "__main__":
    main()
