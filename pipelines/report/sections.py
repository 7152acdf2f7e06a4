"""The report's outline: one section per part of the run, each with its plots and tables, or "not run".

A section is ``{"id", "title", "note", "missing", "figures": [html], "tables": [(caption, headers, rows)]}``; the
HTML page draws the figures, the markdown twin has the same tables (and no figures).
"""
from __future__ import annotations

from pipelines.report import figures, tables
from pipelines.report.collect import TRAIN_STAGES

NOT_RUN = "not run"


def _section(sid: str, title: str, note: str = "", missing: str | None = None) -> dict:
    return {"id": sid, "title": title, "note": note, "missing": missing, "figures": [], "tables": []}


def _add(section: dict, caption: str, table: tables.Table) -> None:
    if table[1]:
        section["tables"].append((caption, *table))


def _fig(section: dict, html: str | None) -> None:
    if html:
        section["figures"].append(html)


def data_section(funnel: dict | None) -> dict:
    s = _section("data", "Data", "Documents in, dropped by each filter and why, duplicates, tokens out.",
                 None if funnel else f"{NOT_RUN} (no data/stats.json)")
    if funnel:
        _fig(s, figures.funnel_figure(funnel))
        _fig(s, figures.drops_figure(funnel))
        _add(s, f"Funnel ({funnel['files']} input files)", tables.funnel_steps(funnel))
        _add(s, "Dropped, by rule", tables.funnel_drops(funnel))
        _add(s, "Duplicates", tables.duplicates(funnel))
        _add(s, "Example duplicate pairs", tables.duplicate_pairs(funnel))
        _add(s, "Tokens out", tables.tokens(funnel))
    return s


def training_sections(curves: dict[str, list[dict] | None]) -> list[dict]:
    notes = {"pretrain": "Next-token loss on the packed shards (val_loss: held-out shards), throughput, MFU.",
             "sft": "Loss on assistant tokens (val_loss: held-out chats).",
             "reward": "Pairwise loss; accuracy and margin on held-out preference pairs.",
             "ppo": "Policy optimisation (PPO or GRPO): reward, KL to the reference (and the controller's target), "
                    "response length, entropy, throughput.",
             "dpo": "Direct preference optimisation: DPO loss, the implicit rewards of chosen and rejected replies "
                    "and their margin, preference accuracy (val_: held-out pairs)."}
    # The recipe's `alignment` trains reward + ppo or dpo: the path a run did not take is left out, not "not run"
    # (dpo is shown only when it ran)
    skipped = {"reward", "ppo"} if curves.get("dpo") and not (curves.get("reward") or curves.get("ppo")) else \
        set() if curves.get("dpo") else {"dpo"}
    out = []
    for stage in TRAIN_STAGES:
        if stage in skipped:
            continue
        rows = curves.get(stage)
        s = _section(f"train-{stage}", f"Training: {stage}", notes[stage],
                     None if rows else f"{NOT_RUN} (no {stage}/metrics.jsonl)")
        if rows:
            _fig(s, figures.training_figure(stage, rows))
            _add(s, "Last values", tables.final_metrics(stage, rows))
        out.append(s)
    return out


def timing_section(timings: list[dict]) -> dict:
    s = _section("timings", "Stage timings", "Wall seconds of each stage as raylm timed it (else the span of "
                 "its metrics).", None if timings else NOT_RUN)
    _fig(s, figures.timings_figure(timings))
    _add(s, "", tables.timings(timings))
    return s


def eval_sections(results: dict | None) -> list[dict]:
    missing = None if results else f"{NOT_RUN} (no eval/results.json; `raylm eval` writes it)"
    ev = _section("eval", "Evaluation", "Every model on the same held-out text, tasks and prompts; change: bits per "
                  "byte against the stage before.", missing)
    sm = _section("samples", "Samples", "One greedy completion per fixed prompt and model.", missing)
    if results:
        _fig(ev, figures.eval_figure(results))
        _add(ev, "Stage by stage", tables.eval_models(results))
        _add(ev, "Held-out data and reward model", tables.heldout(results))
        _add(sm, "", tables.samples(results))
    return [ev, sm]


def lineage_section(records: list[dict] | None) -> dict:
    s = _section("lineage", "Lineage", "What each stage read and wrote, by sha256, re-checked against the disk "
                 "now (`raylm lineage MODEL_DIR` prints every file).",
                 None if records else f"{NOT_RUN} (no <stage>/lineage.json)")
    if records:
        _add(s, "", tables.lineage(records))
    return s


def build_sections(facts: dict) -> list[dict]:
    return [data_section(facts["funnel"]), *training_sections(facts["curves"]), timing_section(facts["timings"]),
            *eval_sections(facts["eval"]), lineage_section(facts["lineage"])]
