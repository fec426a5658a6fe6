"""Exact allocation: the multiple-choice knapsack over predicted damage, solved with HiGHS.

Each unit takes one level; the total predicted damage is minimized under the problem's budget in
its additive currency (`Problem.unit_cost(metric)` summed <= `Problem.budget_total()`), and under
every further limit of a comma-joined budget (`4.0bits,50%sparsity`) as one more row. Units of
one tie group (fused q/k/v, gate/up; `Problem.ties`) are one *item* whose options are the level
ids all members share, costs and damages summed, so they always get one level.

Damage arrives as data (never a model): `damage[u][l]` is the predicted loss of unit u at ladder
index l, one row per unit with one entry per level (ragged ladders: shorter rows). Without it a
prior stands in: every unit equally sensitive, squared error ~ numel * 4^-bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Fidelity, Result, derive_seed, register

Damage = tuple[tuple[float, ...], ...]
_REL_TOL = 1e-12                       # Problem.feasible's tolerance
_SEED_PATH = 0x11B                     # proxy searchers' data-seed path (one fixed batch)


def proxy_fidelity(tokens: int, seed: int) -> Fidelity:
    """The one batch a proxy searcher measures its plans on (the pipeline measures base_ppl on it)."""
    return Fidelity(tokens, derive_seed(seed, _SEED_PATH))


def damage_table(problem: Problem, damage: Damage | None) -> np.ndarray:
    """[U, L] predicted damage (nan past each ladder's end); the prior when `damage` is None."""
    if damage is None:
        return problem.numel[:, None] * 4.0 ** (-problem.code_bits / problem.numel[:, None])
    if len(damage) != problem.n_units:
        raise PlannerError(f"damage has {len(damage)} rows, the problem has {problem.n_units} units")
    out = np.full(problem.code_bits.shape, np.nan)
    for u, row in enumerate(damage):
        if len(row) != problem.n_levels[u] or not np.all(np.isfinite(row)):
            raise PlannerError(f"damage row {u} ({problem.units[u]}) needs {problem.n_levels[u]} finite values, "
                               f"got {list(row)}")
        out[u, :len(row)] = row
    return out


@dataclass(frozen=True)
class Items:
    """The problem as a multiple-choice knapsack: one item per tie group or untied unit."""

    members: tuple[np.ndarray, ...]     # unit indices of each item
    choice: tuple[np.ndarray, ...]      # per item [options, members]: ladder index of each member
    cost: np.ndarray                    # [I, O] summed cost in the budget's currency (inf pad)
    damage: np.ndarray                  # [I, O] summed predicted damage (inf pad)
    extra: tuple[np.ndarray, ...] = ()  # [I, O] summed cost under each further limit of the budget
    extra_limits: tuple[float, ...] = ()

    def to_x(self, options, n_units: int) -> np.ndarray:
        x = np.zeros(n_units, dtype=np.int64)
        for i, o in enumerate(options):
            x[self.members[i]] = self.choice[i][int(o)]
        return x

    def options_of(self, x) -> np.ndarray:
        """Option index per item of a plan that respects the ties (PlannerError otherwise)."""
        x = np.asarray(x)
        out = np.empty(len(self.members), dtype=np.int64)
        for i, (m, ch) in enumerate(zip(self.members, self.choice, strict=True)):
            hit = np.flatnonzero((ch == x[m]).all(axis=1))
            if hit.size == 0:
                raise PlannerError(f"plan splits tie group of units {m.tolist()}: tied units take one level")
            out[i] = hit[0]
        return out

    def damage_of(self, options) -> float:
        return float(self.damage[np.arange(len(options)), np.asarray(options)].sum())

    def spend_of(self, options, table: np.ndarray | None = None) -> float:
        return float((self.cost if table is None else table)[np.arange(len(options)), np.asarray(options)].sum())

    def fits_extra(self, options) -> bool:
        """The further limits hold (the primary one is the caller's: it varies in a sweep)."""
        return all(self.spend_of(options, t) <= lim * (1 + _REL_TOL)
                   for t, lim in zip(self.extra, self.extra_limits, strict=True))


def make_items(problem: Problem, table: np.ndarray) -> Items:
    """Items of `problem` with damages from `table` ([U, L], see `damage_table`)."""
    tables = [problem.unit_cost(b.metric) for b in problem.budget.limits]   # primary first
    tied = problem.tie_groups()
    grouped = {int(u) for g in tied for u in g}
    groups = tied + [np.array([u]) for u in range(problem.n_units) if u not in grouped]
    groups.sort(key=lambda g: int(g.min()))
    members, choice, rows = [], [], []          # rows: per item, [damage, cost per limit...] per option
    for g in groups:
        shared = [lv for lv in problem.levels[g[0]] if all(lv in problem.levels[u] for u in g)]
        if not shared:
            raise PlannerError(f"tied units {[problem.units[u] for u in g]} share no level id")
        ch = np.array([[problem.levels[u].index(lv) for u in g] for lv in shared], dtype=np.int64)
        c = tables[0][g, ch].sum(axis=1)
        ch = ch[np.lexsort((np.arange(len(c)), c))]         # cheapest first, stable
        members.append(g)
        choice.append(ch)
        rows.append([t[g, ch].sum(axis=1) for t in (table, *tables)])
    width = max(len(r[0]) for r in rows)
    padded = np.full((len(tables) + 1, len(rows), width), np.inf)
    for i, r in enumerate(rows):
        for k, v in enumerate(r):
            padded[k, i, :len(v)] = v
    return Items(tuple(members), tuple(choice), padded[1], padded[0], tuple(padded[2:]),
                 tuple(problem.limit(b) for b in problem.budget.also))


def solve_mckp(items: Items, limit: float) -> np.ndarray | None:
    """Option per item minimizing total damage with total cost <= limit and the further limits
    held (None: infeasible).

    HiGHS with a zero relative gap; the rounded solution is re-checked in exact arithmetic and a
    budget row tightened if HiGHS's feasibility tolerance let it overshoot.
    """
    valid = np.isfinite(items.cost)
    item, opt = np.nonzero(valid)
    if item.size == 0:
        return None
    d = items.damage[item, opt] - np.nanmin(np.where(valid, items.damage, np.inf), axis=1)[item]
    d = d / max(float(np.abs(d).max()), 1e-300)          # scale: the objective is O(1)
    tables, limits = (items.cost, *items.extra), np.array([limit, *items.extra_limits])
    scale = np.maximum(np.abs(limits), 1e-300)
    A = np.array([t[item, opt] for t in tables]) / scale[:, None]      # one row per limit
    one = csr_array((np.ones(len(item)), (item, np.arange(len(item)))), shape=(len(items.members), len(item)))
    rhs = limits / scale
    for _ in range(8):
        res = milp(d, integrality=np.ones(len(item)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one, 1, 1), LinearConstraint(A, -np.inf, rhs)],
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        chosen = np.zeros(len(items.members), dtype=np.int64)
        picked = np.flatnonzero(res.x > 0.5)
        chosen[item[picked]] = opt[picked]
        over = np.array([items.spend_of(chosen, t) for t in tables]) - limits * (1 + _REL_TOL)
        if (over <= 0).all():
            return chosen
        rhs -= 2 * np.maximum(over, 0) / scale               # overshoot by tolerance: tighten, solve again
    return None


def exact_plan(problem: Problem, table: np.ndarray) -> np.ndarray:
    """The predicted-damage-optimal plan within the budget (ties respected)."""
    items = make_items(problem, table)
    opts = solve_mckp(items, problem.budget_total())
    if opts is None:
        raise PlannerError(f"no plan meets the budget {problem.budget}")
    return items.to_x(opts, problem.n_units)


@dataclass(frozen=True)
class IlpConfig:
    damage: Damage | None = None     # [unit][level] predicted damage; None: the 4^-bits prior
    score: str = "prior"             # what produced `damage` (a label for reports)
    tokens: int = 2048               # tokens each plan is measured on

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise PlannerError(f"{type(self).__name__}: tokens must be positive, got {self.tokens}")


class FixedPlans:
    """Base of the proxy searchers that measure a fixed list of plans, each with its predicted
    damage, in one batch (one ask, one tell): subclasses only say which plans (`_plans`)."""

    method = ""

    def __init__(self, problem: Problem, config: IlpConfig, seed: int):
        self.problem, self.config = problem, config
        self.plans = self._plans(make_items(problem, damage_table(problem, config.damage)))
        self._seed(seed)
        self.results: list[float] | None = None

    def _plans(self, items: Items) -> list[tuple[tuple[int, ...], float, str]]:
        """(x, predicted damage, label) per plan, all within the budget."""
        raise NotImplementedError

    def _seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.fidelity = proxy_fidelity(self.config.tokens, seed)

    def ask(self) -> list[Candidate]:
        if self.done():
            return []
        return [Candidate(x, self.fidelity, method=self.method, label=label, predicted=pred)
                for x, pred, label in self.plans]

    def tell(self, results: list[Result]) -> None:
        kl = {tuple(r.candidate.x): (r.kl if r.ok else math.inf) for r in results}
        self.results = [kl.get(x, math.inf) for x, _, _ in self.plans]

    def done(self) -> bool:
        return self.results is not None or not self.plans

    def best(self) -> tuple[int, ...] | None:
        """The best measured plan; unmeasured or all failed: the one nearest the budget (last)."""
        if not self.plans:
            return None
        if self.results is None or not any(math.isfinite(v) for v in self.results):
            return self.plans[-1][0]
        return self.plans[int(np.argmin(self.results))][0]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "results": self.results}

    def load_state_dict(self, state: dict) -> None:
        self._seed(state["seed"])
        self.results = None if state["results"] is None else [float(v) for v in state["results"]]


@register("ilp", IlpConfig)
class IlpSearcher(FixedPlans):
    """The exact predicted-damage-optimal plan at the budget (one knapsack solve), measured once."""

    method = "ilp"

    def _plans(self, items: Items) -> list[tuple[tuple[int, ...], float, str]]:
        opts = solve_mckp(items, self.problem.budget_total())
        if opts is None:
            raise PlannerError(f"ilp: no plan meets the budget {self.problem.budget}")
        x = tuple(int(v) for v in items.to_x(opts, self.problem.n_units))
        return [(x, items.damage_of(opts), f"ilp {self.config.score}")]
