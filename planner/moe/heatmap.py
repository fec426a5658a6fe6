"""The per-expert view of a plan: bits of every expert (layer x expert) next to its activation
frequency. Data for the dashboard (`moe_data`, drawn by dashboard.js) and a text table for benches
(`expert_grid`). No torch: reads the run dir (moe_stats.json) and the Problem only.
"""

from __future__ import annotations

import re

import numpy as np

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_layout(problem, stats: dict | None) -> tuple[list[int], int, list[list[list[int]]]]:
    """(MoE layers, experts per layer, unit indices per [layer][expert]); from moe_stats.json when
    there is one, else from unit names (`<block>.experts.<j>.<matrix>`)."""
    members = problem.members or tuple((u,) for u in problem.units)    # tied problems: one unit per group
    index = {n: i for i, names in enumerate(members) for n in names}
    found: dict[tuple[int, int], list[int]] = {}
    if stats:
        for e in stats["experts"]:
            found[(e["block"], e["expert"])] = sorted({index[u] for u in e["units"] if u in index})
    else:
        blocks = problem.blocks or (0,) * problem.n_units
        for i, u in enumerate(problem.units):
            m = _EXPERT.search(u)
            if m:
                found.setdefault((blocks[i], int(m.group(1))), []).append(i)
    layers = sorted({b for b, _ in found})
    n = max((j for _, j in found), default=-1) + 1
    return layers, n, [[found.get((b, j), []) for j in range(n)] for b in layers]


def moe_data(runs) -> dict | None:
    """The dashboard's expert heatmap data (None for a model without experts)."""
    stats = next((s for s in (run.read("moe_stats.json") for run in runs.runs) if isinstance(s, dict)), None)
    layers, n, units = expert_layout(runs.problem, stats)
    if not layers:
        return None
    freq = weight = None
    if stats:
        by = {(e["block"], e["expert"]): e for e in stats["experts"]}
        freq = [[by[(b, j)]["frequency"] if (b, j) in by else None for j in range(n)] for b in layers]
        weight = [[by[(b, j)]["weight"] if (b, j) in by else None for j in range(n)] for b in layers]
    return {"layers": layers, "experts": list(range(n)), "units": units, "frequency": freq, "weight": weight}


def expert_bits(problem, x, units: list[list[list[int]]]) -> np.ndarray:
    """[layers, experts] code bits per weight of each expert under plan x (its matrices, by numel)."""
    x = np.asarray(x)
    out = np.full((len(units), len(units[0]) if units else 0), np.nan)
    for r, row in enumerate(units):
        for c, us in enumerate(row):
            if us:
                us = np.asarray(us)
                out[r, c] = problem.code_bits[us, x[us]].sum() / problem.numel[us].sum()
    return out


def expert_grid(problem, x, stats: dict) -> str:
    """A text table, one row per MoE layer: each expert's bits and (in brackets) its frequency."""
    layers, n, units = expert_layout(problem, stats)
    bits = expert_bits(problem, x, units)
    by = {(e["block"], e["expert"]): e["frequency"] for e in stats["experts"]}
    lines = [f"{'layer':>5}  " + " ".join(f"{'e' + str(j):>10}" for j in range(n))]
    for r, b in enumerate(layers):
        cells = [f"{bits[r, j]:4.1f} ({by.get((b, j), float('nan')):.2f})" for j in range(n)]
        lines.append(f"{b:>5}  " + " ".join(f"{c:>10}" for c in cells))
    f = np.array([[by.get((b, j), np.nan) for j in range(n)] for b in layers])
    ok = np.isfinite(f) & np.isfinite(bits)
    if ok.sum() > 2 and np.std(f[ok]) > 0 and np.std(bits[ok]) > 0:
        lines.append(f"correlation of bits and frequency over experts: {np.corrcoef(f[ok], bits[ok])[0, 1]:+.2f}")
    return "\n".join(lines)
