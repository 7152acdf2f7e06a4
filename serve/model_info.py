"""What the endpoint says about the model it serves, beyond OpenAI's ``Model`` object: where it came from (the
lineage chain of its run, checked against the disk when the replica starts) and how it scored (a summary of the
run's ``eval/results.json``). OpenAI's schema allows extra fields on ``Model``; clients that do not know them
ignore them.

``GET /v1/models/{id}`` carries the whole chain (every recorded file with size and sha256, down to the corpus
files); ``GET /v1/models`` carries the compact form (per stage: record hash, file counts, status), since a
default run's data record alone lists ~2,000 corpus files (~425 KB).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("ray.serve")


def max_model_len(model_dir: str, max_prompt_tokens: int) -> int:
    """The longest prompt this server accepts: the model's positions, capped by ``serve.max_prompt_tokens``."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return min(int(config.get("max_position_embeddings") or max_prompt_tokens), max_prompt_tokens)


def lineage(model_dir: str) -> list[dict] | None:
    """The model's chain of lineage records back to the data stage (``pipelines.lineage.chain``: each record with
    ``changed``/``broken_parents`` as found now); None for a model dir outside a run (no record)."""
    from pipelines.lineage import RECORD, chain, sha256_file

    stage_dir = Path(model_dir).resolve().parent
    if not (stage_dir / RECORD).is_file():
        return None
    try:
        records = chain(stage_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # a record missing or unreadable: say so, serve on
        log.warning("serve: lineage of %s unreadable: %s", model_dir, exc)
        return None
    for record in records:
        record["record_sha256"] = sha256_file(stage_dir.parent / record["stage"] / RECORD)
        record["verified"] = not record["changed"] and not record["broken_parents"]
    return records


def compact_lineage(records: list[dict] | None) -> list[dict] | None:
    if records is None:
        return None
    return [{"stage": r["stage"], "record_sha256": r["record_sha256"], "verified": r["verified"],
             "code": r["code"], "parents": [p["stage"] for p in r["parents"]], "inputs": len(r["inputs"]),
             "outputs": len(r["outputs"])} for r in records]


def eval_summary(model_dir: str) -> dict | None:
    """The headline numbers of ``<run>/eval/results.json`` per model, and which row is the served model (by
    path); None when the run has no eval results."""
    run_root = Path(model_dir).resolve().parent.parent
    path = run_root / "eval" / "results.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        policy = (doc.get("policy") or {}).get("models", {})
        models = []
        for m in doc["models"]:
            row = {"name": m["name"], "weights_sha256": m.get("weights_sha256"),
                   "bits_per_byte": (m.get("bpb") or {}).get("bits_per_byte"),
                   "tasks": (m.get("lm_eval") or {}).get("tasks", {})}
            if m["name"] in policy:  # reward, win rate vs sft, KL to sft (pipelines/eval/policy.py)
                row["policy"] = {k: v for k, v in policy[m["name"]].items() if not isinstance(v, dict)}
            models.append(row)
        served = next((m["name"] for m in doc["models"]
                       if m.get("path") and Path(m["path"]).resolve() == Path(model_dir).resolve()), None)
        reward = doc.get("reward_model")
        return {"results": str(path), "schema_version": doc.get("schema_version"), "served": served,
                "models": models, "reward_model": {"accuracy": reward["accuracy"], "pairs": reward["pairs"]}
                if reward else None}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("serve: %s unreadable: %s", path, exc)
        return None


class ModelInfo:
    """Read once per ingress replica (the files of a finished run do not change under a serving model; a
    changed one shows as ``verified: false``)."""

    def __init__(self, model_dir: str, max_prompt_tokens: int):
        self.max_model_len = max_model_len(model_dir, max_prompt_tokens)
        self.lineage = lineage(model_dir)
        self.eval = eval_summary(model_dir)

    def extras(self, full: bool) -> dict:
        return {"max_model_len": self.max_model_len,
                "lineage": self.lineage if full else compact_lineage(self.lineage), "eval": self.eval}
