"""Lineage: what each stage of a run consumed and produced, as content hashes, and the chain from a model back
to the raw corpus files.

``<run>/<stage>/lineage.json`` (written by the CLI after the stage succeeds):
``{"stage", "recipe": the stage's resolved section, "code": {"git_commit", "git_dirty", "version"},
"inputs": [{"path", "size", "sha256"}], "parents": [{"stage", "record_sha256"}], "outputs": [...]}``.
A parent is named by the sha256 of its record file, so a rerun of an earlier stage shows as a broken link.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cluster.config import atomic_write_json, to_dict
from cluster.storage import location

RECORD = "lineage.json"
# which earlier stages' outputs each stage reads (pipelines/*/stage.py, actors/ppo/stage.py)
PARENTS = {"data": [], "pretrain": ["data"], "sft": ["pretrain"], "reward": ["sft"], "ppo": ["sft", "reward"],
           "eval": ["data", "pretrain", "sft", "ppo"]}
# outputs per stage, relative to the stage dir (globs)
OUTPUTS = {"data": ["shards/*", "documents/*", "tokenizer/tokenizer.json"], "eval": ["results.json"]}
MODEL_OUTPUTS = ["model/*"]


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with location(path).open("rb") as fh:  # a local file or an object (cluster.storage)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path) -> dict:
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def code_version() -> dict:
    """The git commit of this checkout (and whether it had uncommitted changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    out: dict = {"git_commit": None, "git_dirty": None}
    try:
        out["version"] = version("raylm")
    except PackageNotFoundError:
        out["version"] = None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        out["git_commit"] = git("rev-parse", "HEAD")
        out["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package): the version says what ran
    return out


def stage_inputs(recipe, stage: str) -> list[Path]:
    """Files a stage reads that no earlier stage wrote: the corpus, user data files."""
    if stage == "data":
        from pipelines.data.sources import list_corpus_files

        return [p for p in (location(r["path"]) for r in list_corpus_files(recipe.data)) if p.is_file()]
    given = {"sft": recipe.sft.data, "reward": recipe.reward.data, "ppo": recipe.ppo.prompts}.get(stage)
    files = [given] if given else []
    if stage == "eval":
        files += list(recipe.eval.text)
    paths = []
    for f in files:
        p = Path(f)
        paths += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return paths


def stage_outputs(stage_dir, stage: str) -> list:
    return sorted(p for pattern in OUTPUTS.get(stage, MODEL_OUTPUTS) for p in stage_dir.glob(pattern)
                  if p.is_file())


def record_stage(run_root, recipe, stage: str):
    """Write ``<run>/<stage>/lineage.json``; None for a stage without lineage (serve)."""
    if stage not in PARENTS:
        return None
    stage_dir = location(run_root) / stage
    parents = []
    for parent in PARENTS[stage]:
        record = location(run_root) / parent / RECORD
        if record.is_file():
            parents.append({"stage": parent, "record_sha256": sha256_file(record)})
    doc = {"stage": stage, "recipe": to_dict(getattr(recipe, stage)), "code": code_version(),
           "inputs": [file_entry(p) for p in stage_inputs(recipe, stage)], "parents": parents,
           "outputs": [file_entry(p) for p in stage_outputs(stage_dir, stage)]}
    atomic_write_json(stage_dir / RECORD, doc)
    return stage_dir / RECORD


def _changed(entries: list[dict]) -> list[str]:
    """Recorded files whose size or hash no longer match what is on disk."""
    bad = []
    for e in entries:
        p = location(e["path"])
        if not p.is_file() or p.stat().st_size != e["size"] or sha256_file(p) != e["sha256"]:
            bad.append(e["path"])
    return bad


def chain(stage_dir) -> list[dict]:
    """The records from ``stage_dir`` back to the data stage (each once), checked against the disk: every record
    gets ``changed`` (its files that differ now) and ``broken_parents`` (parents rerun since)."""
    run_root, out, todo, seen = stage_dir.parent, [], [stage_dir.name], set()
    while todo:
        stage = todo.pop(0)
        if stage in seen:
            continue
        seen.add(stage)
        path = run_root / stage / RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no lineage record (the stage ran before lineage was recorded?)")
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["changed"] = _changed(doc["inputs"] + doc["outputs"])
        doc["broken_parents"] = [p["stage"] for p in doc["parents"]
                                 if not (run_root / p["stage"] / RECORD).is_file()
                                 or sha256_file(run_root / p["stage"] / RECORD) != p["record_sha256"]]
        out.append(doc)
        todo += [p["stage"] for p in doc["parents"]]
    return out


def format_chain(records: list[dict], max_files: int = 5) -> str:
    lines = []
    for doc in records:
        code = doc["code"]
        where = (code["git_commit"] or "")[:12] + (" (dirty)" if code.get("git_dirty") else "") or code["version"]
        status = "OK" if not doc["changed"] and not doc["broken_parents"] else "CHANGED"
        lines.append(f"{doc['stage']}: {status}  code {where}  parents: "
                     f"{', '.join(p['stage'] for p in doc['parents']) or '-'}")
        for kind in ("outputs", "inputs"):
            entries = doc[kind]
            for e in entries[:max_files]:
                lines.append(f"  {kind[:-1]:6} {e['sha256'][:16]}  {e['size']:>10}  {e['path']}")
            if len(entries) > max_files:
                total = sum(e["size"] for e in entries)
                lines.append(f"  ... {len(entries) - max_files} more {kind} ({len(entries)} files, {total} bytes)")
        for path in doc["changed"]:
            lines.append(f"  changed since recorded: {path}")
        for parent in doc["broken_parents"]:
            lines.append(f"  parent {parent} was rerun or removed since this stage ran")
    return "\n".join(lines)


def lineage_command(model_dir: str) -> int:
    path = location(model_dir).resolve()
    stage_dir = path.parent if (path / "config.json").is_file() or path.name == "model" else path
    records = chain(stage_dir)
    print(format_chain(records))
    return 0 if all(not r["changed"] and not r["broken_parents"] for r in records) else 4
