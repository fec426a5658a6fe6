"""Lagrangian relaxation of the knapsack: for a multiplier lam every item independently takes
argmin(damage + lam * cost), and the spend falls as lam grows. Bisection on lam finds, for any
budget, the plan of the lower convex hull of (cost, predicted damage) that spends the most
without exceeding it: proxy-optimal for the spend it reaches. The same hull, walked one item step
at a time in order of damage added per cost saved, is the ranked path that the accuracy-target
bisection (`search/bisect.py`) searches.

The `lagrange` searcher sweeps budgets from the cheapest plan up to the problem's budget and has
every hull plan measured for real, so the journal holds predicted and measured damage side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.search.base import register
from planner.search.ilp import FixedPlans, IlpConfig, Items, solve_mckp

_REL_TOL = 1e-12


def relaxed_options(items: Items, lam: float) -> np.ndarray:
    """Per item, argmin of damage + lam * cost (options are cheapest first: exact ties go cheap)."""
    with np.errstate(invalid="ignore", over="ignore"):     # lam doubles towards inf when no plan fits
        obj = np.where(np.isfinite(items.cost), items.damage + lam * items.cost, np.inf)
    return np.argmin(obj, axis=1)


def bisect_multiplier(items: Items, limit: float, iters: int = 200) -> np.ndarray | None:
    """Hull plan with the largest spend <= limit (None when even the cheapest plan exceeds it).

    The budget's further limits are checked, not relaxed: a relaxed plan that breaks one counts as
    over budget (None when no multiplier gives a plan that keeps them all)."""
    def fits(opts: np.ndarray) -> bool:
        return items.spend_of(opts) <= limit * (1 + _REL_TOL) and items.fits_extra(opts)

    lo_opts = relaxed_options(items, 0.0)
    if fits(lo_opts):
        return lo_opts
    finite = np.isfinite(items.cost)
    d_scale = float(np.abs(items.damage[finite]).max()) or 1.0
    c_scale = float(np.abs(items.cost[finite]).max()) or 1.0
    lo, hi = 0.0, d_scale / c_scale
    for _ in range(1100):                      # double until the relaxed plan fits (or give up)
        if fits(relaxed_options(items, hi)):
            break
        lo, hi = hi, 2 * hi
    else:
        return None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if fits(relaxed_options(items, mid)):
            hi = mid
        else:
            lo = mid
    opts = relaxed_options(items, hi)
    return opts if fits(opts) else None


def hull_path(items: Items, start) -> list[tuple[int, int]]:
    """Steps (item, option) from `start` down to the cheapest plan along each item's lower convex
    hull, merged in order of damage added per cost saved; plan k applies the first k steps.

    Predicted damage rises and cost falls along the path, so a target can be bisected on it. A step
    never raises a cost under the budget's further limits, so every plan keeps them as `start` does."""
    steps: list[tuple[float, int, int, int]] = []
    for i, cur in enumerate(int(s) for s in start):
        c, d = items.cost[i], items.damage[i]
        n = 0
        while True:
            keeps = np.all([t[i] <= t[i, cur] for t in items.extra], axis=0) if items.extra else True
            cheaper = np.flatnonzero(np.isfinite(c) & (c < c[cur]) & keeps)
            if cheaper.size == 0:
                break
            slope = (d[cheaper] - d[cur]) / (c[cur] - c[cheaper])
            best = slope.min()
            pick = cheaper[slope <= best + 1e-12 * abs(best)]
            nxt = int(pick[np.argmax(c[pick])])              # equal slope: the smallest step first
            steps.append((float(best), i, n, nxt))
            cur, n = nxt, n + 1
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    return [(i, o) for _, i, _, o in steps]


@dataclass(frozen=True)
class LagrangeConfig(IlpConfig):
    points: int = 6                  # budgets swept: evenly from the cheapest plan to the budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.points < 1:
            raise PlannerError(f"lagrange: points must be >= 1, got {self.points}")


@register("lagrange", LagrangeConfig)
class LagrangeSearcher(FixedPlans):
    """Lagrangian sweep: the hull plan for each of several budgets, all measured in one batch."""

    method = "lagrange"

    def _plans(self, items: Items) -> list[tuple[tuple[int, ...], float, str]]:
        limit = self.problem.budget_total()
        cheapest = float(np.nanmin(items.cost, axis=1).sum())
        out, seen = [], set()
        for k in range(1, self.config.points + 1):
            target = cheapest + (limit - cheapest) * k / self.config.points
            opts = bisect_multiplier(items, min(target, limit))
            if opts is None and items.extra:   # a further limit no relaxed plan keeps (latency: not monotone
                opts = solve_mckp(items, min(target, limit))   # in bits): the exact plan for this budget
            if opts is None:
                continue
            x = tuple(int(v) for v in items.to_x(opts, self.problem.n_units))
            if x not in seen:
                seen.add(x)
                out.append((x, items.damage_of(opts), f"lagrange {self.config.score} {k}/{self.config.points}"))
        return out
