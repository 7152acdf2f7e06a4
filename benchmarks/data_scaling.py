"""How ``raylm data`` scales with the corpus: docs/s, the driver's peak memory, the object store's peak use and
the bytes spilled, on 1x, 4x and 16x the built-in corpus's size (1,757 documents, 6.3 MB on this machine).

    .venv/bin/python benchmarks/data_scaling.py [--scales 1,4,16] [--num-cpus 2]

The corpus is generated (pipelines/data/planted.py: random words with planted exact and near duplicates,
~3.9 KB per document like the built-in one) so every scale has the same mix. Each scale runs in a fresh
process that starts its own local Ray cluster and then runs the real command, ``raylm data --input DIR``
(tiny-cpu recipe; ``data.quality.languages=[]``: random words are no language), so the driver measured is
the one a user runs. The time is the command's alone (the cluster is started first); docs/s = documents read
/ that time. The driver's memory is its resident set, sampled every 0.2 s (and its lifetime peak); the object
store's use and the spilled bytes come from the raylet's store statistics, sampled likewise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUILTIN_DOCS = 1757  # the built-in corpus with the default recipe (docs/data.md)
WORDS = 600          # ~3.9 KB per document, the built-in corpus's mean (6.3 MB / 1,757)
MB = 1024 * 1024


def base_docs(scale: float) -> int:
    """planted_corpus(n_base) makes ~1.5 n_base documents (duplicates and hard negatives added)."""
    return max(6, round(BUILTIN_DOCS * scale / 1.5))


class Sampler(threading.Thread):
    """Peaks of this process's RSS and of the local object store's use, and the bytes spilled so far."""

    def __init__(self, gcs_address: str, every_s: float = 0.2):
        super().__init__(daemon=True)
        import psutil
        from ray._private.internal_api import get_state_from_address

        self.proc, self.state, self.every_s = psutil.Process(), get_state_from_address(gcs_address), every_s
        self.rss_peak = self.store_peak = self.spilled = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
        stats = get_memory_info_reply(self.state).store_stats
        self.store_peak = max(self.store_peak, stats.object_store_bytes_used)
        self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()


def child(args) -> None:
    """One scale: start Ray, then time `raylm data` in this process (the driver) while sampling."""
    import ray

    from cluster.cli import main
    from cluster.runtime import idle_worker_limit, node_ip_on_loopback, project_runtime_env

    # init_ray's local cluster, minus the dashboard (not measured, and on a loaded machine its start-up alone
    # can outlast Ray's 30 s node start-up window); `raylm data` below reuses this cluster.
    with node_ip_on_loopback():
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env=project_runtime_env(storage="all"),
                 _system_config={"num_workers_soft_limit": idle_worker_limit(args.num_cpus)})
    for module in ("pipelines.data.stage", "pipelines.lineage", "pipelines.tokenizer"):
        importlib.import_module(module)  # the command's imports first: the growth measured is the run's own

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = Sampler(ray.get_runtime_context().gcs_address)
    sampler.sample()
    sampler.start()
    t0 = time.perf_counter()
    rc = main(["data", "--input", args.input, "--run-dir", args.run_dir, "data.quality.languages=[]"])
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    stats = json.loads((Path(args.run_dir) / "data" / "stats.json").read_text())
    print("RESULT " + json.dumps({
        "rc": rc, "seconds": seconds, "docs": stats["stages"]["input"]["docs_in"],
        "bytes": stats["stages"]["input"]["bytes_in"], "throughput": stats["throughput"],
        "driver_rss_start": rss_start, "driver_rss_peak": max(sampler.rss_peak,
                                                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "store_peak": sampler.store_peak, "spilled": sampler.spilled}), flush=True)
    ray.shutdown()


def run_scale(scale: float, num_cpus: int, tmp: Path) -> dict:
    from pipelines.data.planted import planted_corpus

    corpus = tmp / f"corpus-{scale:g}x"
    planted_corpus(n_base=base_docs(scale), words=WORDS, seed=1).write_jsonl(corpus, files=max(2, int(8 * scale)))
    out = subprocess.run([sys.executable, __file__, "--child", "--input", str(corpus), "--run-dir",
                          str(tmp / f"run-{scale:g}x"), "--num-cpus", str(num_cpus)],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"scale {scale:g}x failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="raylm-data-scaling-") as tmp:
        for scale in (float(s) for s in args.scales.split(",")):
            results[scale] = r = run_scale(scale, args.num_cpus, Path(tmp))
            print(f"{scale:g}x done: {json.dumps(r)}", flush=True)  # kept if a later scale fails
    first = results[min(results)]
    rate0 = first["docs"] / first["seconds"]
    print(f"\n{'scale':>5} {'docs':>7} {'MB':>6} {'seconds':>8} {'docs/s':>7} {'vs 1x':>6} {'driver MB':>10} "
          f"{'(growth)':>9} {'store peak MB':>14} {'spilled MB':>11}")
    for scale, r in results.items():
        rate = r["docs"] / r["seconds"]
        print(f"{scale:>4g}x {r['docs']:>7} {r['bytes'] / MB:>6.1f} {r['seconds']:>8.1f} {rate:>7.0f} "
              f"{rate / rate0:>5.2f}x {r['driver_rss_peak'] / MB:>10.0f} "
              f"{(r['driver_rss_peak'] - r['driver_rss_start']) / MB:>+9.0f} {r['store_peak'] / MB:>14.0f} "
              f"{r['spilled'] / MB:>11.0f}")
    for scale, r in results.items():
        stages = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in r["throughput"].items())
        print(f"{scale:g}x stages: {stages}")


if __name__ == "__main__":
    main()
