"""Dominated-level pruning: each unit's ladder keeps only the levels that are worth their cost.

A ladder is ordered by cost. With many level families mixed (formats, GGUF types, GPTQ), the
rung one step up is often a *worse* level (IQ4_XS at 4.44 bpw -> Q4_0 at 4.50 bpw with twice the
error), so a search that moves one rung at a time wanders among levels no plan should use. Given
every (unit, level)'s error - the layer-local proxy tr(dW H dW^T) of `planner.sensitivity`, cached
next to the levels DB - a level is dropped when another level of the same unit costs no more (in
every limit of the budget) and errs no more:

    errors = session_sensitivity(session, SensitivityConfig(score=Score.PROXY)).rows(problem)
    problem = prune(problem, errors, PruneLevels.DOMINATED)    # or HULL: the lower convex hull only

A pruned ladder is monotone: one rung up costs more and errs less. The cheapest level and the
least-error level of every unit survive, so the cheapest plan and the best plan are unchanged.
Units that must share one level (a tie group, or a fused unit standing for several) are judged on
the summed cost and error of their members and keep one ladder. The cut itself is the one
`planner search --target` uses (`Restriction.problem`): level ids are kept, so plans decode to
the ids of the unpruned levels DB and every other command reads them as usual.
"""

from __future__ import annotations

import numpy as np

from planner.budget import Metric
from planner.problem import Problem
from planner.space import PruneLevels

# costs the levels DB gives, each judged once (a bytes limit is stored bits, like bpw)
_DB_METRIC = {Metric.BITS: Metric.BITS, Metric.BPW: Metric.BPW, Metric.BYTES: Metric.BPW,
              Metric.DENSITY: Metric.DENSITY}


def front(costs: np.ndarray, error: np.ndarray, hull: bool = False) -> list[int]:
    """Indices (ascending) of the levels no other level dominates: `costs` [metrics, levels] (the
    first metric is the one the hull is drawn in), `error` [levels]. Of exact duplicates the first
    is kept. With `hull`, only the front's points on the lower convex hull of (cost, error) remain:
    each rung up then buys at most as much error per unit of cost as the rung below it."""
    costs, error = np.atleast_2d(np.asarray(costs, dtype=np.float64)), np.asarray(error, dtype=np.float64)
    n = len(error)
    keep = []
    for j in range(n):
        no_worse = (costs <= costs[:, [j]]).all(axis=0) & (error <= error[j])
        better = (costs < costs[:, [j]]).any(axis=0) | (error < error[j])
        earlier_twin = np.arange(n) < j
        if not (no_worse & (better | earlier_twin) & (np.arange(n) != j)).any():
            keep.append(j)
    return _lower_hull(costs[0], error, keep) if hull else keep


def _lower_hull(cost: np.ndarray, error: np.ndarray, idx: list[int]) -> list[int]:
    """The points of `idx` on the lower convex hull of (cost, error) (Andrew's monotone chain)."""
    chain: list[int] = []
    for j in sorted(idx, key=lambda i: (cost[i], error[i])):
        while len(chain) >= 2:
            o, a = chain[-2], chain[-1]
            turn = (cost[a] - cost[o]) * (error[j] - error[o]) - (error[a] - error[o]) * (cost[j] - cost[o])
            if turn > 0:
                break
            chain.pop()
        chain.append(j)
    return sorted(chain)


def _metrics(problem: Problem) -> list[Metric]:
    """The levels-DB costs the budget limits, the budget's own first (the hull's axis). Hardware
    costs (latency, memory) are attached after pruning and do not take part."""
    out = [_DB_METRIC[b.metric] for b in problem.budget.limits if b.metric in _DB_METRIC]
    return list(dict.fromkeys(out or [Metric.BPW]))


def prune(problem: Problem, errors, mode: PruneLevels) -> Problem:
    """`problem` with each ladder cut to its non-dominated levels (`mode` DOMINATED) or to their
    lower convex hull (HULL); NONE returns it as is. `errors[u][l]` is the error of unit u at
    ladder position l (a fused unit's: its members' sum, as `Sensitivity.rows` gives)."""
    if mode is PruneLevels.NONE:
        return problem
    from planner.export.targets import Restriction  # the cut `search --target` makes

    tables = [problem.unit_cost(m) for m in _metrics(problem)]
    tied = [tuple(int(i) for i in g) for g in problem.tie_groups()]
    grouped = {i for g in tied for i in g}
    allowed: list[tuple[int, ...]] = [()] * problem.n_units
    for group in tied + [(i,) for i in range(problem.n_units) if i not in grouped]:
        kept = _group_front(problem, group, [*tables, errors], mode is PruneLevels.HULL)
        for m in group:
            allowed[m] = tuple(j for j, lv in enumerate(problem.levels[m]) if lv in kept)
    return Restriction(problem, tuple(allowed), tuple(tied)).problem()


def _group_front(problem: Problem, group: tuple[int, ...], tables: list, hull: bool) -> set[str]:
    """The level ids on the front of units that take one level together: each table ([U][L] costs,
    the errors last) summed over the group's members, over the level ids every member has."""
    ids = [lv for lv in problem.levels[group[0]] if all(lv in problem.levels[m] for m in group)]
    at = [[problem.levels[m].index(lv) for m in group] for lv in ids]
    summed = np.array([[sum(t[m][j] for m, j in zip(group, js, strict=True)) for js in at] for t in tables])
    return {ids[k] for k in front(summed[:-1], summed[-1], hull)}
