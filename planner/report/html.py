"""One self-contained HTML page for a run dir: header + held-out table, Pareto scatter, per-layer
heatmap of the best plan, convergence. Reads only the run dir (never torch / the model); plotly.js
is embedded inline once, so the page works offline.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from planner.budget import Metric
from planner.errors import BadPlan
from planner.plan import Plan
from planner.problem import Problem
from planner.rundir import Row, RunDir

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}
tr:has(.best) td{background:#fff3c4;font-weight:bold}.note{color:#555}"""


def write_report(run: RunDir, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else run.path / "report.html"
    problem = run.load_problem() if (run.path / "problem.json").is_file() else None
    rows, held, best = run.results(), run.heldout(), run.read("best_plan.json")
    parts = [_header(run, problem, held, best)]
    figures: list[go.Figure] = []

    def section(title: str, body: go.Figure | str) -> None:
        parts.append(f"<h2>{title}</h2>")
        if isinstance(body, go.Figure):
            # plotly.js goes inline with the first figure only; later figures reuse it
            parts.append(pio.to_html(body, include_plotlyjs=not figures, full_html=False))
            figures.append(body)
        else:
            parts.append(f"<p class=note>{body}</p>")

    failed = sum(not _ok(r) for r in rows)
    section("Pareto: KL vs size", pareto_figure(rows, held, problem) if rows or held
            else "No evaluations yet: results.jsonl and heldout.jsonl are empty or missing.")
    if failed:
        parts.append(f"<p class=note>{failed} failed evaluation(s) in the journal (error or no positive KL) are not plotted.</p>")
    if best is None or problem is None:
        section("Best plan per layer", "No best plan yet (best_plan.json is missing).")
    else:
        try:
            x = problem.encode(Plan.from_json(best))
        except (BadPlan, KeyError, ValueError):
            section("Best plan per layer", "best_plan.json does not match the units and levels in problem.json.")
        else:
            section("Best plan per layer", layer_heatmap(problem, x))
            if problem.cost(x).density < 1:       # pruning levels: the kept fraction per layer too
                section("Best plan per layer: sparsity", layer_heatmap(problem, x, sparsity=True))
            parts.append(kind_table(problem, x))
    conv = convergence_figure(_history(run.read("checkpoint.json", {})), rows)
    section("Convergence", conv if conv is not None else "No convergence data (no searcher history, no evo rows).")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(_name(run))}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# --- header and tables ---------------------------------------------------------------------
def _name(run: RunDir) -> str:
    return str(run.config.get("name") or run.path.name)


def _header(run: RunDir, problem: Problem | None, held: list[Row], best: dict | None) -> str:
    cfg = run.config
    fields = "".join(f"<tr><th>{k}</th><td style='text-align:left'>{html.escape(_text(cfg.get(k)))}</td></tr>"
                     for k in ("model", "dataset", "budget", "method", "seed"))
    out = [f"<h1>planner run: {html.escape(_name(run))}</h1><table>{fields}</table>"]
    out.append(f"<p class=note>{units_note(problem)}</p>")
    out.append("<h2>Held-out measurements</h2>")
    out.append(summary_table(held, best.get("id") if best else None) if held
               else "<p class=note>No held-out measurements yet (heldout.jsonl is missing).</p>")
    return "".join(out)


def _text(v) -> str:
    return "—" if v is None else v if isinstance(v, str) else json.dumps(v)


def units_note(problem: Problem | None) -> str:
    if problem is None:
        return "No problem.json yet: the search never started, so no units or costs are known."
    kinds = ", ".join(_kinds_order(problem))
    outside = any(re.search(r"embed|lm_head", u) for u in problem.units)
    return (f"bits = nominal code bits per weight; bpw = stored bits per weight (scales, zeros and masks "
            f"included); both count the {problem.total_numel:,} weights of the {problem.n_units} planned "
            f"decoder-block linear layers ({kinds}); embeddings and lm_head are "
            f"{'partly planned (see units)' if outside else 'excluded'}. Budget: {problem.budget}.")


def summary_table(held: list[Row], best_id: str | None) -> str:
    labelled = any(r.label == "best" for r in held)     # else: the row measuring best_plan.json

    def label(r: Row) -> str:
        is_best = r.label == "best" if labelled else (best_id is not None and r.plan_id == best_id)
        text = html.escape(r.label or r.plan_id)
        return f"<span class=best>★ {text}</span>" if is_best else text

    df = pd.DataFrame({"label": [label(r) for r in held], "bits": [r.bits for r in held],
                       "bpw": [r.bpw for r in held], "MB": [r.bytes / 1e6 for r in held],
                       "KL": [r.kl for r in held], "perplexity": [r.ppl for r in held],
                       "tokens": [r.tokens for r in held]}).sort_values("bits")
    fmt = {"bits": "{:.3f}".format, "bpw": "{:.3f}".format, "MB": "{:.2f}".format, "KL": "{:.4g}".format,
           "perplexity": "{:.3f}".format}
    return df.to_html(index=False, escape=False, formatters=fmt, border=0)


def kind_table(problem: Problem, x: np.ndarray) -> str:
    idx = (np.arange(problem.n_units), x)
    df = pd.DataFrame({"kind": _unit_kinds(problem), "numel": problem.numel,
                       "code": problem.code_bits[idx], "stored": problem.stored_bits[idx],
                       "kept": problem.unit_cost(Metric.DENSITY)[idx]})
    g = df.groupby("kind", sort=False).sum()
    table = pd.DataFrame({"units": df.groupby("kind", sort=False).size(), "weights (M)": g.numel / 1e6,
                          "avg bits": g.code / g.numel, "avg bpw": g.stored / g.numel, "sparsity": 1 - g.kept / g.numel})
    return table.to_html(float_format="{:.3f}".format, border=0)


# --- figures ----------------------------------------------------------------------------------
def _ok(r: Row) -> bool:
    return r.error is None and math.isfinite(r.kl) and r.kl > 0


def _hover(r: Row) -> str:
    return (f"plan {r.plan_id}<br>bits {r.bits:.3f} | bpw {r.bpw:.3f} | {r.bytes / 1e6:.2f} MB<br>"
            f"KL {r.kl:.4g} | ppl {r.ppl:.3f}<br>{r.method} gen {r.generation} stage {r.stage} | {r.tokens} tokens")


def _front(xs: list[float], ks: list[float]) -> list[int]:
    """Indices of the non-dominated points (minimize x and KL), sorted by x."""
    front, best = [], math.inf
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], ks[i])):
        if ks[i] < best:
            front.append(i)
            best = ks[i]
    return front


def pareto_figure(rows: list[Row], held: list[Row], problem: Problem | None) -> go.Figure:
    rows, held = [r for r in rows if _ok(r)], [r for r in held if _ok(r)]
    toks = np.log2([max(r.tokens, 1) for r in rows] or [1])
    span = float(toks.max() - toks.min()) or 1.0
    fig, methods = go.Figure(), list(dict.fromkeys(r.method for r in rows))
    for m in methods:
        sel = [(r, t) for r, t in zip(rows, toks, strict=True) if r.method == m]
        fig.add_scatter(x=[r.bits for r, _ in sel], y=[r.kl for r, _ in sel], mode="markers", name=f"journal: {m}",
                        hovertext=[_hover(r) for r, _ in sel], hoverinfo="text", meta="journal",
                        marker=dict(size=[6 + 10 * (t - toks.min()) / span for _, t in sel], opacity=0.6))
    symbols = ["star" if r.label == "best" else "diamond" if r.label.startswith("uniform") else "square" for r in held]
    fig.add_scatter(x=[r.bits for r in held], y=[r.kl for r in held], mode="markers+text", name="held-out",
                    text=[r.label for r in held], textposition="top center", hovertext=[_hover(r) for r in held],
                    hoverinfo="text", marker=dict(symbol=symbols, size=14, color="black", line=dict(width=1)))
    fig.add_scatter(x=[], y=[], mode="lines", name="held-out front", line=dict(color="black", dash="dot"))

    def view(axis: str) -> tuple[dict, dict]:
        hx = [getattr(r, axis) for r in held]
        front = _front(hx, [r.kl for r in held])
        xs = [[getattr(r, axis) for r in rows if r.method == m] for m in methods]
        ys = [list(tr.y) for tr in fig.data[:-1]]
        b = _budget_on(problem, axis)
        shapes = [] if b is None else [dict(type="line", x0=b, x1=b, y0=0, y1=1, yref="paper",
                                            line=dict(color="red", dash="dash"))]
        notes = [] if b is None else [dict(x=b, y=1, yref="paper", text=f"budget {problem.budget}",
                                           showarrow=False, xanchor="left", font=dict(color="red"))]
        return ({"x": xs + [hx, [hx[i] for i in front]], "y": ys + [[held[i].kl for i in front]]},
                {"xaxis.title.text": axis, "shapes": shapes, "annotations": notes})

    axis = "bits" if problem is None or problem.budget.metric is Metric.BITS else "bpw"   # the budget's currency
    data, layout = view(axis)
    for trace, x, y in zip(fig.data, data["x"], data["y"], strict=True):
        trace.update(x=x, y=y)
    fig.update_layout(xaxis_title=axis, shapes=layout["shapes"], annotations=layout["annotations"])
    buttons = [dict(label=a, method="update", args=list(view(a))) for a in ("bits", "bpw")]
    fig.update_layout(yaxis=dict(type="log", title="KL to base model"), height=560, legend_title="click to hide",
                      updatemenus=[dict(buttons=buttons, x=0, y=1.12, xanchor="left", direction="right")])
    return fig


def _budget_on(problem: Problem | None, axis: str) -> float | None:
    """The budget as a position on the bits or bpw axis, or None when it is in the other currency."""
    if problem is None:
        return None
    b = problem.budget
    if b.metric is Metric.BYTES:
        return b.value * 8 / problem.total_numel if axis == "bpw" else None
    return b.value if b.metric.value == axis else None


def _unit_kinds(problem: Problem) -> list[str]:
    return list(problem.kinds) or [u.rsplit(".", 1)[-1] for u in problem.units]


def _kinds_order(problem: Problem) -> list[str]:
    return list(dict.fromkeys(_unit_kinds(problem)))


def layer_heatmap(problem: Problem, x: np.ndarray, sparsity: bool = False) -> go.Figure:
    """Bits per weight of every (kind, block) cell; with `sparsity`, the pruned fraction instead."""
    kinds = _kinds_order(problem)
    kept = problem.unit_cost(Metric.DENSITY)
    blocks = list(problem.blocks) or [int(m.group(1)) if (m := re.search(r"\.(\d+)\.", u)) else 0
                                      for u in problem.units]
    cols = sorted(set(blocks))
    code, numel = np.zeros((len(kinds), len(cols))), np.zeros((len(kinds), len(cols)))
    text = [[[] for _ in cols] for _ in kinds]
    for u, (kind, blk) in enumerate(zip(_unit_kinds(problem), blocks, strict=True)):
        i, j = kinds.index(kind), cols.index(blk)      # a cell may hold several units (MoE experts)
        code[i, j] += problem.numel[u] - kept[u, x[u]] if sparsity else problem.code_bits[u, x[u]]
        numel[i, j] += problem.numel[u]
        text[i][j].append(problem.levels[u][x[u]])
    z = np.where(numel > 0, code / np.maximum(numel, 1), np.nan)
    text = [[", ".join(dict.fromkeys(t)) for t in row] for row in text]
    what = "sparsity" if sparsity else "bits"
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=kinds, text=text, texttemplate="%{z:.2g}", colorscale="Viridis",
                               colorbar=dict(title=what),
                               hovertemplate="%{y} block %{x}<br>%{text}<br>%{z:.3f} " + what + "<extra></extra>"))
    fig.update_layout(xaxis_title="decoder block", yaxis=dict(autorange="reversed"), height=120 + 40 * len(kinds))
    return fig


def _history(ckpt: dict) -> list[list[float]]:
    for d in (ckpt, *(ckpt.get(k) for k in ("searcher", "state", "searcher_state"))):
        if isinstance(d, dict) and isinstance(d.get("history"), list):
            return [h for h in d["history"] if isinstance(h, (list, tuple)) and len(h) >= 2]
    return []


def convergence_figure(history: list[list[float]], rows: list[Row]) -> go.Figure | None:
    evo = [r for r in rows if r.method == "evo" and _ok(r)]
    if not history and not evo:
        return None
    fig = go.Figure()
    if history:
        fig.add_scatter(x=[h[0] for h in history], y=[h[1] for h in history], mode="lines+markers",
                        name="searcher fitness")
    if evo:
        best = pd.DataFrame({"g": [r.generation for r in evo], "kl": [r.kl for r in evo]}).groupby("g").kl.min()
        fig.add_scatter(x=best.index.tolist(), y=best.tolist(), mode="lines+markers", name="best KL in journal (evo)")
    fig.update_layout(xaxis_title="generation", yaxis=dict(type="log", title="KL"), height=400)
    return fig
