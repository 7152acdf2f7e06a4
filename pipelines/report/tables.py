"""The report's tables as (headers, rows) of plain strings, shared by the HTML page and its markdown twin so
the two always say the same."""
from __future__ import annotations

Table = tuple[list[str], list[list[str]]]


def num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def funnel_steps(funnel: dict) -> Table:
    rows = [[s["step"], num(s["docs_in"]), num(s["docs_out"]), num(s["docs_in"] - s["docs_out"]),
             num(s.get("bytes_out"))] for s in funnel["steps"]]
    return ["step", "docs in", "docs out", "dropped", "bytes out"], rows


def funnel_drops(funnel: dict) -> Table:
    rows = [[d["step"], d["rule"], num(d["docs"]), num(d["bytes"])]
            for d in sorted(funnel["drops"], key=lambda d: -d["docs"])]
    return ["step", "rule (why)", "docs", "bytes"], rows


def duplicates(funnel: dict) -> Table:
    rows = [[name, num(d.get("duplicates")), num(d.get("clusters")), num(d.get("candidate_pairs")),
             num(d.get("verified_pairs")),
             ", ".join(f"{k}x{v}" for k, v in sorted((d.get("cluster_sizes") or {}).items(),
                                                       key=lambda kv: -int(kv[0]))[:6])]
            for name, d in funnel["duplicates"].items()]
    return ["step", "duplicates dropped", "clusters", "candidate pairs", "verified pairs",
            "largest clusters (size x count)"], rows


def duplicate_pairs(funnel: dict) -> Table:
    rows = [[p["kind"], p["dropped"], p["kept"], p["kept_text"].replace("\n", " ")[:160]] for p in funnel["pairs"]]
    return ["kind", "dropped (source)", "duplicate of (source)", "kept text (start)"], rows


def tokens(funnel: dict) -> Table:
    rows = [[split, num(n)] for split, n in funnel["tokens"].items()]
    rows += [["vocabulary", num(funnel["vocab_size"])], ["sequence length", num(funnel["seq_len"])],
             ["bytes per token (corpus after dedup)", num(funnel["bytes_per_token"])]]
    return ["", "value"], rows


def timings(items: list[dict]) -> Table:
    return ["stage", "seconds", "from"], [[t["stage"], f"{t['seconds']:.1f}", t["source"]] for t in items]


def final_metrics(stage: str, rows: list[dict]) -> Table:
    """The last value of every numeric metric of a training stage."""
    last: dict = {}
    for r in rows:
        last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("time", "epoch", "step", "eval_step")})
    return ["metric", "last value"], [[k, num(v)] for k, v in sorted(last.items())]


def eval_models(results: dict) -> Table:
    """One row per model in run order, with the change in bits per byte from the stage before."""
    models = results.get("models") or []
    metrics = sorted({(t, k) for m in models for t, res in (m.get("lm_eval") or {}).get("tasks", {}).items()
                      for k, v in res.items() if isinstance(v, (int, float)) and not k.endswith("_stderr")
                      and k != "sample_len"})
    headers = ["model", "bits per byte", "change", "loss (nats/token)", "tokens/byte", "parameters"]
    headers += [f"{t} {k}" for t, k in metrics]
    rows, prev = [], None
    for m in models:
        bpb = m["bpb"]["bits_per_byte"]
        row = [m["name"], f"{bpb:.4f}", "-" if prev is None else f"{bpb - prev:+.4f}", num(m["bpb"]["loss"]),
               num(m["bpb"]["tokens_per_byte"]), num(m.get("parameters"))]
        for t, k in metrics:
            res = (m.get("lm_eval") or {}).get("tasks", {}).get(t, {})
            err = res.get(f"{k}_stderr")
            row.append("-" if k not in res else num(res[k], 3) + (f" ± {num(err, 2)}" if isinstance(err, float)
                                                                   else ""))
        rows.append(row)
        prev = bpb
    return headers, rows


def heldout(results: dict) -> Table:
    h = results.get("heldout") or {}
    rm = results.get("reward_model")
    rows = [["held-out text", (f"{h.get('source')}: {num(h.get('documents'))} documents, {num(h.get('bytes'))} "
             f"bytes{' (truncated)' if h.get('truncated') else ''}")], ["held-out sha256", str(h.get("sha256"))]]
    if rm:
        rows.append(["reward model", (f"accuracy {num(rm['accuracy'], 3)}, margin {num(rm['margin'], 3)} on "
                     f"{num(rm['pairs'])} held-out pairs ({rm['data']})")])
    return ["", ""], rows


def samples(results: dict) -> Table:
    models = results.get("models") or []
    prompts = list(dict.fromkeys(s["prompt"] for m in models for s in m["samples"]["items"]))
    rows = []
    for prompt in prompts:
        for m in models:
            for s in m["samples"]["items"]:
                if s["prompt"] == prompt:
                    rows.append([prompt, f"{m['name']} ({m['samples']['format']})", s["completion"]])
    return ["prompt", "model", "greedy completion"], rows


def lineage(records: list[dict]) -> Table:
    rows = []
    for doc in records:
        code = doc.get("code") or {}
        where = (code.get("git_commit") or "")[:12] + (" (dirty)" if code.get("git_dirty") else "") \
            or str(code.get("version"))
        status = "unchecked" if doc.get("changed") is None else \
            "OK" if not doc["changed"] and not doc["broken_parents"] else "CHANGED"
        outs = doc.get("outputs") or []
        main = max(outs, key=lambda e: e["size"], default=None)  # the weights / the biggest shard
        rows.append([doc["stage"], status, where, ", ".join(p["stage"] for p in doc.get("parents", [])) or "-",
                     f"{len(doc.get('inputs', []))} files, {num(sum(e['size'] for e in doc.get('inputs', [])))} B",
                     f"{len(outs)} files" + (f"; {main['path']} sha256 {main['sha256'][:16]}" if main else "")])
    return ["stage", "check", "code", "parents", "inputs", "outputs (largest)"], rows
