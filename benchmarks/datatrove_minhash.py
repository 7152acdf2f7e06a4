"""datatrove's MinHash dedup as a baseline for benchmarks/dedup.py: ``run_datatrove(ids, texts, cfg)``.

datatrove lives in its own venv (~/.cache/raylm/datatrove-venv, built once from PINS) so its dependencies
(spaCy, xxhash, orjson, its own numpy) never touch the project venv; benchmarks/_datatrove_job.py runs
there and drives the four on-disk stages (signatures -> buckets -> cluster -> filter) with
LocalPipelineExecutor.

Matched to NearDedupConfig: 5-word shingles, 128 hashes as 16 buckets x 8 hashes, seed 1. Parallelism
(``tasks``, default 2 = this machine's cores): stages 1 and 4 run ``tasks`` tasks on ``tasks`` workers,
one JSONL file per task; stage 2 must run a multiple of ``num_buckets`` tasks, so 16 (one per bucket) on
a pool of ``tasks`` workers; stage 3 is one task by design. Every stage starts its own forkserver pool:
that overhead is part of datatrove and is timed.

What differs from ours (lower-cased ``\\w+`` words, 5-word shingles, Jaccard checked >= ``threshold``):
- no Jaccard check: a pair that agrees on all 8 hashes of any one bucket is a duplicate, so
  ``cfg.threshold`` has no counterpart: pairs at Jaccard 0.7 / 0.5 are called duplicates with
  probability 0.61 / 0.06 where ours drops them (precision can be lower; recall a little higher);
- normalisation (``simplify_text``): lower-case, every digit run -> "0", punctuation from its own list
  (ASCII + many Unicode marks, "_" included, which ``\\w`` keeps) -> space, whitespace collapsed,
  diacritics stripped (NFD, combining marks dropped); ours keeps digits and diacritics;
- words: spaCy's blank English tokenizer over that text, not a regex; on punctuation-free text it mostly
  splits on spaces, but its exceptions split some words ("cannot" -> "can" "not", "gonna" -> "gon" "na").
  It is also most of datatrove's time here; ``tokenizer="split"`` swaps in str.split();
- hashing: a shingle is xxhash64 of its space-joined words, permuted as (a*x + b) mod 2^61-1 with numpy
  RandomState(seed) parameters: other hash functions than ours, so signatures differ for equal shingles;
- clusters: union-find over the pairs; datatrove keeps its union-find root, we report every cluster member
  with ``keeper`` = the smallest id (as benchmarks/dedup.py scores every method).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.data.components import duplicate_keepers

JOB = Path(__file__).resolve().parent / "_datatrove_job.py"
ENV = Path(os.environ.get("RAYLM_DATATROVE_ENV", Path.home() / ".cache" / "raylm" / "datatrove-venv"))
# the versions installed when this was written; datatrove's own `processing` extra asks for xxhash<4 and its
# English word tokenizer is spaCy's blank "en" (no model download); orjson is its JsonlReader's parser;
# tokenizers only because datatrove.pipeline.dedup imports it at package import
PINS = ("datatrove==0.10.1", "xxhash==3.8.2", "spacy==3.8.18", "orjson==3.13.0", "regex==2026.11.15",
        "tokenizers==0.23.3", "numpy==2.4.6")


def _clean_env() -> dict[str, str]:
    # the project venv must not leak into the datatrove venv's interpreter
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def ensure_env(env: Path = ENV) -> Path:
    """The datatrove venv's python; builds the venv once (a marker with the pins says it is complete)."""
    python, marker = env / "bin" / "python", env / "raylm-pins.txt"
    if python.exists() and marker.exists() and marker.read_text() == "\n".join(PINS):
        return python
    print(f"datatrove: creating {env} with {' '.join(PINS)} (once, ~30 s)...", file=sys.stderr, flush=True)
    shutil.rmtree(env, ignore_errors=True)  # a half-built env from an interrupted run
    base = getattr(sys, "_base_executable", sys.executable)  # the system python, not the project venv's
    if shutil.which("uv"):
        cmds = [["uv", "venv", "--python", base, str(env)],
                ["uv", "pip", "install", "--python", str(python), *PINS]]
    else:
        cmds = [[base, "-m", "venv", str(env)], [str(python), "-m", "pip", "install", "-q", *PINS]]
    for cmd in cmds:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_clean_env())
        if out.returncode:
            raise RuntimeError(f"datatrove venv: `{' '.join(cmd)}` failed ({out.returncode}): "
                               f"{out.stderr[-2000:]}")
    marker.write_text("\n".join(PINS))
    print(f"datatrove: venv ready at {env}", file=sys.stderr, flush=True)
    return python


def run_datatrove(ids, texts, cfg, tokenizer: str = "spacy", tasks: int = 2) -> tuple[float, pd.DataFrame]:
    """datatrove MinHash on (ids, texts) with ``cfg``'s shingle size, bands x rows and seed.

    ``tokenizer``: "spacy" is datatrove as shipped for English; "split" swaps in a str.split() WordTokenizer
    (closer to our words; most of stage 1's time is spaCy), through datatrove's custom-tokenizer hook.
    ``tasks``: input files = stage 1/4 tasks = workers of every pooled stage.

    Returns (wall seconds of the 4 stages only: no venv build, corpus writing or interpreter start; use this,
    not the time around the call, for docs/s) and rows ``id, keeper, cluster_size`` for every id in a cluster.
    Raises RuntimeError if datatrove cannot be installed or run."""
    python = ensure_env()
    with tempfile.TemporaryDirectory(prefix="raylm-datatrove-") as tmp:
        work = Path(tmp)
        (work / "input").mkdir()
        chunk = -(-len(ids) // tasks)
        for rank in range(tasks):  # contiguous chunks, one file per task: task r reads {r:05d}.jsonl only
            rows = range(rank * chunk, min(len(ids), (rank + 1) * chunk))
            with open(work / "input" / f"{rank:05d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"id": ids[i], "text": texts[i]}) + "\n" for i in rows)
        cmd = [str(python), str(JOB), str(work), "--tasks", str(tasks), "--workers", str(tasks),
               "--n-grams", str(cfg.shingle_size), "--buckets", str(cfg.bands), "--rows", str(cfg.rows),
               "--seed", str(cfg.seed), "--tokenizer", tokenizer]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_clean_env(), cwd=tmp)
        if out.returncode or not (work / "result.json").exists():
            raise RuntimeError(f"datatrove run failed ({out.returncode}): {out.stderr[-3000:]}")
        result = json.loads((work / "result.json").read_text())
    split = " / ".join(f"{x:.2f}" for x in result["stage_seconds"])
    print(f"datatrove {result['version']}: signatures / buckets / cluster / filter {split} s",
          file=sys.stderr)
    removed = np.array([r for r, _ in result["removed"]], dtype=object)
    kept = np.array([k for _, k in result["removed"]], dtype=object)
    return float(result["seconds"]), duplicate_keepers(removed, kept)


if __name__ == "__main__":  # smoke run: python benchmarks/datatrove_minhash.py
    from cluster.schemas.data import NearDedupConfig
    from pipelines.data.planted import planted_corpus

    corpus = planted_corpus(n_base=200, words=200, seed=1)
    t0 = time.perf_counter()
    ids, texts = [d["id"] for d in corpus.docs], [d["text"] for d in corpus.docs]
    secs, frame = run_datatrove(ids, texts, NearDedupConfig())
    print(f"{secs:.2f}s in stages ({time.perf_counter() - t0:.2f}s in all), {len(frame)} ids in clusters")
