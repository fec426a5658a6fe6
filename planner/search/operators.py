"""Budget operators shared by every searcher: repair, the level-switch mutation, a uniform start.

Written once so evo, NSGA-II and random search move through the space the same way. Every
operator takes an explicit `numpy.random.Generator` and returns a new int64 vector (inputs are
never modified). Costs come from `problem.unit_cost(budget.metric)`, an [U, L] table padded with
nan past the end of each unit's ladder; ladders are cheapest first.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from planner.problem import Problem

_REL_TOL = 1e-12      # the same tolerance as Problem.feasible


def _costs(problem: Problem) -> tuple[np.ndarray, float, np.ndarray]:
    """(cost table with nan replaced by +inf, budget limit with tolerance, top level per unit)."""
    c = np.nan_to_num(problem.unit_cost(problem.budget.metric), nan=np.inf)
    return c, problem.budget_total() * (1 + _REL_TOL), problem.n_levels - 1


def _raise_deltas(x: np.ndarray, c: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Extra cost of raising each unit one step (inf where it is already at the top)."""
    rows = np.arange(len(x))
    up = np.minimum(x + 1, top)
    return np.where(x < top, c[rows, up] - c[rows, x], np.inf)


def _step(x: np.ndarray, u: int, by: int) -> np.ndarray:
    y = x.copy()
    y[u] += by
    return y


def _eases(x: np.ndarray, problem: Problem) -> np.ndarray:
    """[U] bool: a one-step lowering of the unit lowers the spend of some broken limit."""
    rows, lower = np.arange(len(x)), np.maximum(x - 1, 0)
    out = np.zeros(len(x), dtype=bool)
    for b in problem.budget.limits:
        if problem.spend(x, b.metric) > problem.limit(b) * (1 + _REL_TOL):
            c = np.nan_to_num(problem.unit_cost(b.metric), nan=np.inf)
            out |= c[rows, lower] < c[rows, x]
    return out


def _prefer(pool: np.ndarray, near: np.ndarray | None) -> np.ndarray:
    """The units of `pool` inside `near` (a bool mask), or all of `pool` when none are."""
    if near is None:
        return pool
    inside = pool[near[pool]]
    return inside if inside.size else pool


def from_block(problem: Problem, units: Iterable[int]) -> np.ndarray | None:
    """Mask of the units in the earliest block of `units` or after it (None without block indices):
    a repair that stays there leaves the parent's prefix intact, which the prefix cache skips."""
    units = list(units)
    if not problem.blocks or not units:
        return None
    blocks = np.asarray(problem.blocks)
    return blocks >= blocks[units].min()


def fill_slack(x: np.ndarray, problem: Problem, rng: np.random.Generator,
               near: np.ndarray | None = None) -> np.ndarray:
    """Raise random units one step while any raise still fits, so plans end near the budget
    (preferring units in the `near` mask when one is given)."""
    x = np.array(x, dtype=np.int64)
    c, limit, top = _costs(problem)
    spend = problem.spend(x)
    while True:
        fits = np.flatnonzero(spend + _raise_deltas(x, c, top) <= limit)
        if problem.budget.also:      # further limits (4.0bits,50%sparsity): a raise must keep them too
            fits = np.array([u for u in fits if problem.feasible(_step(x, u, 1))], dtype=np.int64)
        if fits.size == 0:
            return x
        u = int(rng.choice(_prefer(fits, near)))
        x[u] += 1
        spend = problem.spend(x)     # re-summed, not accumulated: no float drift past the budget


def repair(x, problem: Problem, rng: np.random.Generator, frozen: Iterable[int] = (),
           fill: bool = True, near: np.ndarray | None = None) -> np.ndarray:
    """Bring x within budget, then fill the slack.

    Over budget: lower random units one step, preferring units not in `frozen` (a mutation's
    raised units, so the repair does not undo the move it repairs). Then `fill_slack`, unless
    `fill` is False (multi-objective search, where the budget is only an upper bound and plans
    below it are wanted). When no step down helps (a latency limit: 2-bit kernels can be slower
    than 4-bit ones) the nearest feasible plan is solved for instead. The result is feasible
    whenever any plan is. `near` (a bool mask over units): lower and raise units inside it when
    any of them can move (a local repair), others only when none can.
    """
    x = np.clip(np.array(x, dtype=np.int64), 0, problem.n_levels - 1)
    frozen_mask = np.zeros(len(x), dtype=bool)
    frozen_mask[list(frozen)] = True
    while not problem.feasible(x):
        down = x > 0
        if problem.budget.also:      # lower only units whose step down eases a limit that is broken
            down &= _eases(x, problem)
        if not down.any():           # a cost that does not grow along the ladders (latency) can need
            return nearest_feasible(x, problem)   # raises: the nearest plan that keeps every limit
        pool = np.flatnonzero(down & ~frozen_mask)
        if pool.size == 0:
            pool = np.flatnonzero(down)
        x[int(rng.choice(_prefer(pool, near)))] -= 1
    return fill_slack(x, problem, rng, near) if fill else x


def nearest_feasible(x, problem: Problem) -> np.ndarray:
    """The plan within every limit that moves the fewest ladder steps away from x (an exact
    multiple-choice knapsack; tie groups kept); x itself when no plan meets the budget."""
    from planner.search.ilp import make_items, solve_mckp

    x = np.asarray(x, dtype=np.int64)
    steps = np.abs(np.arange(problem.code_bits.shape[1])[None, :] - x[:, None]).astype(np.float64)
    items = make_items(problem, np.where(np.isnan(problem.code_bits), np.nan, steps))
    opts = solve_mckp(items, problem.budget_total())
    return x.copy() if opts is None else items.to_x(opts, problem.n_units)


def n_switches(rng: np.random.Generator, max_switches: int = 3) -> int:
    """EvoPress's switch count: min of two uniform draws in 1..max, so small moves dominate."""
    return int(min(rng.integers(1, max_switches + 1), rng.integers(1, max_switches + 1)))


def level_switch(x, problem: Problem, rng: np.random.Generator, n_switches: int,
                 same_size_only: bool = False, fill: bool = True, local: bool = False) -> np.ndarray:
    """EvoPress's mutation: each switch raises one unit one step and lowers another one step.

    same_size_only: the lowered unit has the same numel and the same step cost as the raised one,
    so the spend is unchanged exactly (EvoPress's default). A switch with no such partner is
    skipped. Otherwise any two units trade and the result is repaired with the raised units
    frozen: attention and MLP can trade bits, which same-size swaps never do. `local`: the repair
    moves units at or after the earliest switched block first, so the offspring keeps the parent's
    prefix, which the evaluator's prefix cache skips.
    """
    x = np.array(x, dtype=np.int64)
    c, _, top = _costs(problem)
    rows = np.arange(len(x))
    raised: list[int] = []
    touched = np.zeros(len(x), dtype=bool)         # never lower a unit just raised, nor vice versa
    for _ in range(n_switches):
        up_cost = _raise_deltas(x, c, top)
        down_cost = np.where(x > 0, c[rows, x] - c[rows, np.maximum(x - 1, 0)], np.nan)
        can_down = (x > 0) & ~touched
        for a in rng.permutation(np.flatnonzero((x < top) & ~touched)):
            ok = can_down.copy()
            ok[a] = False
            if same_size_only:
                ok &= (problem.numel == problem.numel[a]) & np.isclose(down_cost, up_cost[a], rtol=1e-12, atol=0)
            if ok.any():
                b = int(rng.choice(np.flatnonzero(ok)))
                x[a] += 1
                x[b] -= 1
                touched[[a, b]] = True
                raised.append(int(a))
                break
    if same_size_only and problem.feasible(x):   # same step cost in the budget's metric; other limits may move
        return x
    near = from_block(problem, np.flatnonzero(touched)) if local else None
    return repair(x, problem, rng, frozen=raised, fill=fill, near=near)


def level_step(x, problem: Problem, rng: np.random.Generator, n_steps: int) -> np.ndarray:
    """Move `n_steps` distinct random units one ladder step up or down (within each ladder).

    Unlike `level_switch` the spend changes: the move that walks a multi-objective search along
    the size axis. Not repaired here; callers repair (with fill=False to keep smaller plans).
    """
    x = np.array(x, dtype=np.int64)
    top = problem.n_levels - 1
    units = rng.choice(len(x), size=min(n_steps, len(x)), replace=False)
    step = rng.choice([-1, 1], size=len(units))
    x[units] = np.clip(x[units] + step, 0, top[units])
    return x


def fill_uniform(problem: Problem, rng: np.random.Generator) -> np.ndarray:
    """The highest single level (ladder index clipped per unit) that fits, then the slack filled."""
    top = problem.n_levels - 1
    best = np.zeros(problem.n_units, dtype=np.int64)
    for level in range(int(top.max()) + 1):
        x = np.minimum(level, top).astype(np.int64)
        if not problem.feasible(x):
            break
        best = x
    return repair(best, problem, rng)
