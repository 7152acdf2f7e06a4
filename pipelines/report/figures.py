"""The report's plots, drawn by plotly (interactive in the browser; its JS is inlined once per page so the HTML
file stands alone offline). Each function returns an HTML fragment, or None when there is nothing to draw."""
from __future__ import annotations

import math

# stage -> panels (title, metric keys drawn on one axis); a key absent from the stage's metrics is skipped
PANELS = {
    "pretrain": [("loss", ["loss", "val_loss"]), ("tokens/s", ["tokens_per_s"]), ("MFU", ["mfu"]),
                 ("learning rate", ["lr"]), ("grad norm", ["grad_norm"])],
    "sft": [("loss", ["loss", "val_loss"]), ("tokens/s", ["tokens_per_s"]), ("learning rate", ["lr"]),
            ("grad norm", ["grad_norm"])],
    "reward": [("loss", ["loss", "val_loss"]), ("held-out accuracy", ["val_accuracy"]),
               ("held-out margin", ["val_margin"]), ("tokens/s", ["tokens_per_s"])],
    "ppo": [("reward", ["reward_mean"]), ("KL to reference", ["kl", "kl_target", "kl_per_token"]),
            ("KL coefficient", ["kl_coef"]),
            ("response length", ["response_len"]), ("entropy", ["entropy"]), ("samples/s", ["samples_per_s"]),
            ("policy / value loss", ["policy_loss", "value_loss"]), ("seconds per step", ["time_generate",
                                                                                       "time_score", "time_train"])],
    "dpo": [("loss", ["loss", "val_loss"]), ("implicit rewards", ["chosen_reward", "rejected_reward", "margin"]),
            ("preference accuracy", ["accuracy", "val_accuracy"]), ("tokens/s", ["tokens_per_s"]),
            ("learning rate", ["lr"])],
}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def to_html(fig, name: str) -> str:
    # A fixed div id (plotly's default is random) keeps a rerun's report byte-identical.
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}", config=PLOT_CONFIG)


def _step(row: dict):
    return row.get("step", row.get("eval_step"))  # the reward stage logs held-out figures under eval_step


def training_figure(stage: str, rows: list[dict]) -> str | None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS[stage]]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    n_rows = math.ceil(len(panels) / 2)
    fig = make_subplots(rows=n_rows, cols=2, subplot_titles=[t for t, _ in panels], vertical_spacing=0.12 / n_rows)
    for i, (_, keys) in enumerate(panels):
        for key in keys:
            pts = [(_step(r), r[key]) for r in rows if key in r and _step(r) is not None]
            sparse = len(pts) < len(rows) / 2  # held-out evaluations: a few points, show them as markers
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=f"{key}",
                                     mode="lines+markers" if sparse else "lines", legendgroup=key),
                          row=i // 2 + 1, col=i % 2 + 1)
    # x is the step everywhere: said once in the title (axis titles would collide with the next row's titles)
    fig.update_layout(height=260 * n_rows, margin={"t": 60, "b": 30, "l": 50, "r": 20},
                      title=f"{stage} (x: step)")
    return to_html(fig, stage)


def funnel_figure(funnel: dict) -> str | None:
    import plotly.graph_objects as go

    steps = funnel["steps"]
    if not steps:
        return None
    labels = ["documents read"] + [f"after {s['step']}" for s in steps]
    values = [steps[0]["docs_in"]] + [s["docs_out"] for s in steps]
    fig = go.Figure(go.Funnel(y=labels, x=values, textinfo="value+percent initial"))
    fig.update_layout(height=360, margin={"t": 30, "b": 20}, title="documents kept after each step")
    return to_html(fig, "funnel")


def drops_figure(funnel: dict) -> str | None:
    import plotly.graph_objects as go

    bars = [(f"{d['step']}: {d['rule']}", d["docs"]) for d in funnel["drops"]]
    bars += [(f"{name}: duplicate", d["duplicates"]) for name, d in funnel["duplicates"].items() if d.get("duplicates")]
    if not bars:
        return None
    labels, values = zip(*sorted(bars, key=lambda b: b[1]))  # the largest on top
    fig = go.Figure(go.Bar(x=list(values), y=list(labels), orientation="h", text=list(values), textposition="auto"))
    fig.update_layout(height=120 + 24 * len(labels), margin={"t": 30, "b": 20}, title="documents dropped, by rule")
    return to_html(fig, "drops")


def timings_figure(timings: list[dict]) -> str | None:
    import plotly.graph_objects as go

    if not timings:
        return None
    fig = go.Figure(go.Bar(x=[t["seconds"] for t in timings], y=[t["stage"] for t in timings], orientation="h",
                           text=[f"{t['seconds']:.1f} s" for t in timings], textposition="auto"))
    fig.update_layout(height=100 + 30 * len(timings), margin={"t": 30, "b": 20}, title="wall seconds per stage",
                      yaxis={"autorange": "reversed"})
    return to_html(fig, "timings")


def eval_figure(results: dict) -> str | None:
    """Bits per byte per model (the one number that compares across tokenizers) beside each lm-eval accuracy."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    models = results.get("models") or []
    if not models:
        return None
    names = [m["name"] for m in models]
    tasks = sorted({t for m in models for t in (m.get("lm_eval") or {}).get("tasks", {})})
    fig = make_subplots(rows=1, cols=1 + len(tasks),
                        subplot_titles=["bits per byte (lower is better)"] + [f"{t} acc" for t in tasks])
    fig.add_trace(go.Bar(x=names, y=[m["bpb"]["bits_per_byte"] for m in models], name="bits per byte"), 1, 1)
    for j, task in enumerate(tasks, start=2):
        accs = [((m.get("lm_eval") or {}).get("tasks", {}).get(task) or {}).get("acc") for m in models]
        fig.add_trace(go.Bar(x=names, y=accs, name=f"{task} acc"), 1, j)
    fig.update_layout(height=340, margin={"t": 40, "b": 30}, showlegend=False)
    return to_html(fig, "eval")
