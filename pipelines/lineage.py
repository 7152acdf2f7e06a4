"""Lineage: what each stage of a run consumed and produced, as content hashes, and the chain from a model back
to the raw corpus files.

``<run>/<stage>/lineage.json`` (written by the CLI after the stage succeeds):
``{"stage", "recipe": the stage's resolved section, "code": {"git_commit", "git_dirty", "version"},
"inputs": [{"path", "size", "sha256"}], "parents": [{"stage", "record_sha256", "outputs_sha256"}],
"outputs": [...]}``. A parent is named by the sha256 of its record file, so a rerun of an earlier stage shows as a
broken link, and by a digest of its outputs, so a rerun that changed what this stage read is told from one that
only rewrote the record (``stale_inputs``).
"""
from __future__ import annotations

import fnmatch
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
           "dpo": ["sft"], "eval": ["data", "pretrain", "sft", "ppo", "dpo"]}
# outputs per stage, relative to the stage dir (globs)
OUTPUTS = {"data": ["shards/*", "documents/*", "tokenizer/tokenizer.json"], "eval": ["results.json"]}
MODEL_OUTPUTS = ["model/*"]
# What children read of a stage's outputs (globs under its stage dir; default: MODEL_OUTPUTS): the data stage's
# documents/ are for eval only, and their file names differ on every run (Ray Data names them)
CONSUMED = {"data": ["shards/*", "tokenizer/tokenizer.json"], "eval": ["results.json"]}
# What a rerun of a stage on the same run dir picks up from its earlier run instead of recomputing it (globs under
# the stage dir): the data stage's tokenizer, the training stages' checkpoints (they resume).
REUSED = {"data": ["tokenizer/tokenizer.json"], "pretrain": ["checkpoint_*"], "sft": ["checkpoint_*"],
          "reward": ["checkpoint_*"], "ppo": ["checkpoints"]}


def base_model(recipe, stage: str) -> str | None:
    """The user's starting model a stage reads instead of its parent's (``--model``), if any."""
    return {"sft": recipe.sft.base_model, "reward": recipe.reward.base_model,
            "ppo": recipe.ppo.policy_model}.get(stage)


def stage_parents(recipe, stage: str) -> list[str]:
    """PARENTS, less the stage whose model a base model replaces (a stale record there is no parent)."""
    replaced = {"sft": "pretrain", "reward": "sft", "ppo": "sft"}.get(stage) if base_model(recipe, stage) else None
    return [p for p in PARENTS[stage] if p != replaced]


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
    given = {"sft": recipe.sft.data, "reward": recipe.reward.data, "ppo": recipe.ppo.prompts,
             "dpo": recipe.dpo.data}.get(stage)
    files = [given] if given else []
    model = base_model(recipe, stage)
    if model and Path(model).expanduser().is_dir():  # a hub id is no local file: the recipe section names it
        files.append(str(Path(model).expanduser()))
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


def outputs_digest(stage_dir, entries: list[dict]) -> str:
    """One sha256 over the recorded outputs of a stage that its children read (``CONSUMED``), by path relative
    to the stage dir (a moved run dir still matches)."""
    prefix = str(stage_dir).rstrip("/") + "/"  # strings: stage_dir may be an object-store URI
    patterns = CONSUMED.get(location(stage_dir).name, MODEL_OUTPUTS)
    digest = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e["path"]):
        rel = e["path"].removeprefix(prefix)
        if any(fnmatch.fnmatch(str(rel), pattern) for pattern in patterns):
            digest.update(f"{rel}\0{e['size']}\0{e['sha256']}\n".encode())
    return digest.hexdigest()


def parent_entry(run_root, parent: str) -> dict | None:
    record = location(run_root) / parent / RECORD
    if not record.is_file():
        return None
    doc = json.loads(record.read_text(encoding="utf-8"))
    return {"stage": parent, "record_sha256": sha256_file(record),
            "outputs_sha256": outputs_digest(location(run_root) / parent, doc["outputs"])}


def record_stage(run_root, recipe, stage: str):
    """Write ``<run>/<stage>/lineage.json``; None for a stage without lineage (serve)."""
    if stage not in PARENTS:
        return None
    stage_dir = location(run_root) / stage
    parents = [e for e in (parent_entry(run_root, p) for p in stage_parents(recipe, stage)) if e is not None]
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


def stale_inputs(run_root, recipe, stage: str) -> list[str]:
    """What changed since ``stage`` last succeeded in this run dir: its own input files (changed, added or
    removed since its record) and parents whose outputs differ now from those it read. [] when it has no record
    (never ran to the end here: nothing to compare with)."""
    run_root = location(run_root)
    path = run_root / stage / RECORD
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    recorded = {e["path"]: e for e in doc["inputs"]}
    current = {str(p) for p in stage_inputs(recipe, stage)}
    changed = [p for p in sorted(recorded.keys() | current)
               if p not in recorded or p not in current or _changed([recorded[p]])]
    for parent in doc["parents"]:
        if "outputs_sha256" not in parent:  # recorded before parents' outputs were: only the record hash to go on
            continue
        now = parent_entry(run_root, parent["stage"])
        if now is None or now["outputs_sha256"] != parent["outputs_sha256"]:
            changed.append(f"{run_root / parent['stage']} (the {parent['stage']} stage's outputs changed since "
                           f"{stage} ran)")
    return changed


def reused_state(stage_dir, stage: str) -> list:
    return sorted(p for pattern in REUSED.get(stage, []) for p in location(stage_dir).glob(pattern))


def check_reusable(run_root, recipe, stage: str) -> None:
    """A training stage resumes from its checkpoints when rerun: never from checkpoints whose inputs changed
    since (it would continue a model of other data as if up to date). Fails naming the changed files. The data
    stage handles its own (it retrains the tokenizer: pipelines/data/tokenize.py)."""
    if stage == "data":
        return
    stage_dir = location(run_root) / stage
    state = reused_state(stage_dir, stage)
    if not state:
        return
    changed = stale_inputs(run_root, recipe, stage)
    if changed:
        raise ValueError(f"{stage}: {stage_dir} holds checkpoints ({state[0].name}, ...) a rerun would resume, but "
                         f"what they were trained from changed: {'; '.join(changed[:5])}"
                         f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''}. Remove them "
                         f"(rm -r {' '.join(str(p) for p in state)}) to train afresh")


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
