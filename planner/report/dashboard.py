"""The dashboard: one self-contained offline page for one or more run dirs.

Python gathers the data (`dashboard_data`, JSON-able, built from `report/tables.py`); the page
embeds it as JSON next to plotly.js (inline, once) and a small script (`dashboard.js`) that draws
and links the views: the Pareto scatter of every measured plan (colour = method, diamonds =
uniform plans, the merged front within the budget highlighted), the selected plan's per-layer
heatmap, level table and export command, a budget slider that selects the best plan under it,
convergence and hypervolume per method against evaluations, predicted vs measured damage, and the
sensitivity per unit. `planner dashboard` serves the same page and its data, refreshed
(`report/serve.py`). Reads only run dirs: never torch or the model.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from planner.budget import Metric
from planner.moe.heatmap import moe_data
from planner.report.html import summary_table, units_note
from planner.report.tables import Runs, load_runs, ok_rows
from planner.search.hypervolume import points_hypervolume

EXPORT_FORMATS = ("llamacpp", "gptqmodel", "compressed-tensors", "packed")
_SCRIPT = Path(__file__).with_name("dashboard.js")
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.4em 0}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
tr:has(.best) td{background:#fff3c4;font-weight:bold}.note{color:#555}.row{display:flex;gap:1em;flex-wrap:wrap}
.row>div{flex:1 1 600px;min-width:0}#levels{max-height:320px;overflow:auto}#levels td:first-child{text-align:left}
code{background:#f3f3f3;padding:3px 6px;display:inline-block}.controls{margin:.5em 0}.hidden{display:none}"""


def _clean(v):
    """JSON for browsers: numpy scalars to Python, NaN/inf to null (JSON.parse rejects them)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray, pd.Series)):
        return [_clean(x) for x in list(v)]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _header(runs: Runs) -> str:
    out = [f"<p class=note>{units_note(runs.problem)}</p>"]
    for name, run in zip(runs.names, runs.runs, strict=True):
        cfg = run.config
        fields = " | ".join(f"{k} <b>{html.escape(str(cfg.get(k)))}</b>" for k in ("method", "budget", "seed", "space")
                            if cfg.get(k) is not None)
        held, best = run.heldout(), run.read("best_plan.json")
        table = (summary_table(held, best.get("id") if best else None) if held
                 else "<p class=note>No held-out measurements yet.</p>")
        out.append(f"<details{' open' if len(runs.runs) == 1 else ''}><summary>run <b>{html.escape(name)}</b> "
                   f"({html.escape(str(run.path))}): {fields}</summary>{table}</details>")
    return "".join(out)


def _curves(runs: Runs) -> tuple[dict, dict]:
    """Per method, at the end of each (run, generation): evaluations so far, best KL within the
    budget so far, and the hypervolume of everything measured so far (KL and the budget's size)."""
    p, metric = runs.problem, runs.budget.metric
    size = metric.value
    conv, hv = {}, {}
    for method, r in runs.rows.groupby("method", sort=False):
        r = r.reset_index(drop=True)
        ends = r.index[(r.run != r.run.shift(-1)) | (r.generation != r.generation.shift(-1))]
        ok = r.error.isna() & np.isfinite(r.kl.astype(float))
        within = ok & (r[size] <= p.budget.value * (1 + 1e-12))
        best = r.kl.where(within).cummin()
        conv[method] = {"evals": [int(i) + 1 for i in ends], "best": [best[i] for i in ends],
                        "generation": [int(r.generation[i]) for i in ends]}
        hv[method] = {"evals": conv[method]["evals"], "generation": conv[method]["generation"],
                      "hv": [points_hypervolume(p, (metric,), r.kl[: i + 1][within[: i + 1]],
                                                [r[size][: i + 1][within[: i + 1]]]) for i in ends]}
    return conv, hv


def _predicted(runs: Runs) -> dict:
    r = ok_rows(runs.rows)
    r = r[r.predicted.notna()]
    return {m: {"predicted": g.predicted.tolist(), "kl": g.kl.tolist(), "id": g.plan_id.tolist(), "label": g.label.tolist()}
            for m, g in r.groupby("method", sort=False)}


def _sensitivity(runs: Runs) -> dict | None:
    for name, run in zip(runs.names, runs.runs, strict=True):
        s = run.read("sensitivity.json")
        if isinstance(s, dict) and "units" in s and "value" in s:
            value = dict(zip(s["units"], s["value"], strict=False))
            return {"run": name, "score": s.get("score", ""), "value": [value.get(u) for u in runs.problem.units]}
    return None


def dashboard_data(runs: Runs) -> dict:
    p, plans = runs.problem, runs.plans
    kinds = list(dict.fromkeys(p.kinds or [u.rsplit(".", 1)[-1] for u in p.units]))
    unit_kinds = list(p.kinds or [u.rsplit(".", 1)[-1] for u in p.units])
    blocks = list(p.blocks) or [0] * p.n_units
    conv, hv = _curves(runs)
    best = {name: (run.read("best_plan.json") or {}).get("id") for name, run in zip(runs.names, runs.runs, strict=True)}
    return _clean({
        "version": f"{len(runs.rows)}-{len(runs.heldout)}-{sorted(best.items())}",
        "title": "planner dashboard: " + ", ".join(runs.names), "header": _header(runs),
        "budget": {"metric": p.budget.metric.value, "value": p.budget.value / (1e6 if p.budget.metric is Metric.BYTES else 1),
                   "text": str(p.budget)},
        "runs": {name: str(run.path) for name, run in zip(runs.names, runs.runs, strict=True)},
        "units": {"name": list(p.units), "kind": [kinds.index(k) for k in unit_kinds], "block": blocks,
                  "numel": p.numel, "levels": [list(lv) for lv in p.levels],
                  "bits": p.code_bits / p.numel[:, None], "bpw": p.stored_bits / p.numel[:, None],
                  # pruned fraction per (unit, level); None when no level prunes
                  "sparsity": None if p.kept is None else 1 - p.kept / p.numel[:, None]},
        "kinds": kinds, "blocks": sorted(set(blocks)),
        "plans": {"id": list(plans.index), "x": [runs.xs[i] for i in plans.index], "kl": plans.kl, "ppl": plans.ppl,
                  "bits": plans.bits, "bpw": plans.bpw, "mb": plans.bytes / 1e6, "method": plans.method,
                  "methods": plans.methods, "run": plans.run, "generation": plans.generation, "tokens": plans.tokens,
                  "label": plans.label, "uniform": plans.uniform, "within": plans.within,
                  "front_bits": plans.front_bits, "front_bpw": plans.front_bpw, "front_mb": plans.front_bytes,
                  "ms": plans.latency * 1e3, "front_ms": plans.front_latency,   # runs with a latency limit/objective
                  "predicted": plans.predicted, "heldout_kl": plans.heldout_kl, "evaluations": plans.evaluations},
        "best": runs.best_id(), "run_best": best, "export_formats": EXPORT_FORMATS,
        "convergence": conv, "hypervolume": hv, "predicted": _predicted(runs), "sensitivity": _sensitivity(runs),
        "moe": moe_data(runs),      # MoE models: per-expert bits next to activation frequency (planner/moe)
        "failed": int(len(runs.rows) - len(ok_rows(runs.rows))),
    })


def data_json(data: dict) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def render(data: dict, live: dict | None = None) -> str:
    """The whole page; `live` = {"url": ..., "every": seconds} makes it poll for fresh data."""
    from plotly.offline import get_plotlyjs

    boot = data_json({**data, "live": live})
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(data["title"])}</title>
<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>
<h1>{html.escape(data["title"])}</h1><div id="header"></div>
<h2>Pareto: KL vs size <span class=note id="counts"></span></h2>
<div class="controls">x axis <select id="axis"><option value="bits">bits</option><option value="bpw">bpw</option>
<option value="mb">MB</option></select> &nbsp; budget <input type="range" id="budget" style="width:40%">
<span id="budget-text"></span> <span class=note>(selects the lowest-KL plan at or under it)</span></div>
<div id="scatter" style="height:560px"></div>
<h2>Selected plan <span id="selected" data-plan=""></span></h2>
<p>export: <code id="export"></code> <select id="export-format"></select></p>
<div class="row"><div id="heatmap"></div><div id="levels"></div></div>
<div id="experts-box" class="hidden"><h2>Experts: bits of the selected plan and activation frequency</h2>
<div id="experts"></div></div>
<div id="sensitivity-box" class="hidden"><h2>Sensitivity per unit <span class=note id="sens-note"></span></h2>
<div id="sensitivity"></div></div>
<div class="row"><div><h2>Convergence</h2><div id="convergence"></div></div>
<div><h2>Hypervolume</h2><p class=note>KL (log, 1e-3 to 10 nats) and the budget's size (cheapest plan to the
budget), normalized; 1.0 = everything up to the budget at the noise floor.</p><div id="hypervolume"></div></div></div>
<div id="predicted-box" class="hidden"><h2>Predicted vs measured damage</h2><div id="predicted"></div></div>
<script type="application/json" id="planner-data">{boot}</script>
<script>{_SCRIPT.read_text(encoding="utf-8")}</script></body></html>"""


def write_dashboard(paths, out: Path | None = None) -> Path:
    """Render the dashboard of run dir(s) `paths` to `out` (default RUN/report.html for one run,
    ./report.html for several); written atomically."""
    runs = load_runs(paths)
    out = Path(out) if out is not None else (runs.runs[0].path / "report.html" if len(runs.runs) == 1
                                              else Path("report.html"))
    page = render(dashboard_data(runs))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
