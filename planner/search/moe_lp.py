"""MC-MoE expert allocation: one integer program over every (expert, level) and (dense unit, level).

Each MoE expert takes one level for all its matrices (MC-MoE's one bitwidth per expert); its cost
at level l is

    c_e(l) = frequency_e^a * weight_e^b * error_e(l)

(frequency: share of calibration tokens routed to it; weight: its mean routing weight; error: the
mean squared error of its output on its routed tokens with its matrices at level l, alone).
Ablations: `frequency` replaces error_e(l) by the layer's mean error profile (importance from
routing only), `error` drops frequency and weight (a = b = 0). `measured` takes each expert's
measured damage (below) as its cost, no exponents.

One global budget (the problem's, in its own currency, so a plan meets it exactly as the Problem
accounts it) covers experts and dense units (attention, shared experts, dense MLPs) in a single
program. To make the two commensurate, every layer's expert costs are rescaled so that at the
layer's cheapest level they sum to the experts' physical damage there, and dense units come with
damage in the same currency. The pipeline (planner/moe/stats.py) measures both at the decoder
block's output, per calibration token: a dense unit's error with the block re-run, an expert's
routing-weighted output error (`expert_damage`); without `expert_damage` the physical quantity is
frequency * weight^2 * error, paired with dense errors at each linear's own output (the older,
`linear` currency). Both are multiplied by the block's gain (the measured KL of the block's units
at their cheapest level over their predicted total), so errors of early blocks, which travel
through every later one, weigh what they cost. The exponents decide how a layer's share is spread
over its experts, not how large it is.
Options: `layer_budget` also holds each MoE layer's experts to the budget's average (MC-MoE's
per-layer budget); `min_count` demands at least n experts per layer at a level.

Statistics arrive as data in the frozen config (this package never imports torch or the model);
without any (a dense model) every unit is dense with ilp's prior, numel * 4^-bits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import register
from planner.search.ilp import FixedPlans, Items, damage_table

_REL_TOL = 1e-12      # Problem.feasible's tolerance


class Cost(str, enum.Enum):
    FULL = "full"              # frequency^a * weight^b * error
    FREQUENCY = "frequency"    # frequency^a * weight^b * the layer's mean error profile
    ERROR = "error"            # error alone
    MEASURED = "measured"      # the measured damage (expert_damage) itself


@dataclass(frozen=True)
class MoeLpConfig:
    # statistics (planner.moe.stats.lp_data fills these from calibration data)
    experts: tuple[tuple[int, ...], ...] = ()     # per expert: indices of its units (its matrices)
    layers: tuple[int, ...] = ()                  # per expert: its MoE layer (decoder block)
    frequency: tuple[float, ...] = ()             # per expert: share of tokens routed to it
    weight: tuple[float, ...] = ()                # per expert: mean routing weight when routed
    levels: tuple[str, ...] = ()                  # level ids the errors were measured at
    error: tuple[tuple[float, ...], ...] = ()     # [expert][level]: output error, matrices at that level
    expert_damage: tuple[tuple[float, ...], ...] = ()   # [expert][level]: block-output damage (or () : f w^2 error)
    dense: tuple[int, ...] = ()                   # indices of the dense units
    damage: tuple[tuple[float, ...], ...] = ()    # [dense unit][ladder index]: output error E||dW x||^2
    # the program
    cost: str = "full"
    a: float = 1.0
    b: float = 1.0
    layer_budget: bool = False
    min_count: tuple[tuple[str, int], ...] = ()   # (level id, n): at least n experts per layer there
    tokens: int = 2048                            # tokens the plan is measured on

    def __post_init__(self) -> None:
        if self.cost not in {c.value for c in Cost}:
            raise PlannerError(f"moe-lp: cost must be one of {', '.join(c.value for c in Cost)}, got {self.cost!r}")
        if self.tokens <= 0 or self.a < 0 or self.b < 0:
            raise PlannerError("moe-lp: tokens > 0 and exponents a, b >= 0 are required")
        n = len(self.experts)
        if not (len(self.layers) == len(self.frequency) == len(self.weight) == len(self.error) == n):
            raise PlannerError("moe-lp: experts, layers, frequency, weight and error need one entry per expert")
        if any(len(row) != len(self.levels) for row in self.error) or len(self.damage) != len(self.dense):
            raise PlannerError("moe-lp: one error per level per expert and one damage row per dense unit are required")
        if self.expert_damage and (len(self.expert_damage) != n or any(len(r) != len(self.levels) for r in self.expert_damage)):
            raise PlannerError("moe-lp: expert_damage needs one row per expert and one entry per level")
        if self.cost == Cost.MEASURED.value and n and not self.expert_damage:
            raise PlannerError("moe-lp: cost measured needs the experts' measured damage (expert_damage)")
        if any(k < 0 for _, k in self.min_count):
            raise PlannerError("moe-lp: min_count entries must be (level id, n >= 0)")


def expert_costs(config: MoeLpConfig) -> np.ndarray:
    """[experts, levels] cost of each expert at each level: the variant's weighting, rescaled per
    layer to the physical damage (`expert_damage`, else frequency * weight^2 * error) at the layer's
    cheapest (largest-damage) level."""
    f, w = np.asarray(config.frequency, float), np.asarray(config.weight, float)
    err = np.asarray(config.error, float).reshape(len(config.experts), len(config.levels))
    layers = np.asarray(config.layers)
    physical = (np.asarray(config.expert_damage, float).reshape(err.shape) if config.expert_damage
                else (f * w ** 2)[:, None] * err)
    cost = Cost(config.cost)
    if cost is Cost.MEASURED:
        return physical
    out = np.empty_like(err)
    for layer in np.unique(layers):
        m = layers == layer
        if cost is Cost.ERROR:
            c = err[m]
        else:
            profile = err[m] if cost is Cost.FULL else np.broadcast_to(err[m].mean(axis=0), err[m].shape)
            c = (f[m] ** config.a * w[m] ** config.b)[:, None] * profile
        ref = int(np.argmax(physical[m].sum(axis=0)))
        scale = physical[m][:, ref].sum() / c[:, ref].sum() if c[:, ref].sum() > 0 else 1.0
        out[m] = c * scale
    return out


def moe_items(problem: Problem, config: MoeLpConfig) -> tuple[Items, np.ndarray, int]:
    """(items, layer per item (-1 for dense), number of expert items): experts first, each one item
    whose options are the level ids in `config.levels` every one of its matrices has; then the dense
    units, tie groups (Problem.ties) merged into one item."""
    cost_table = problem.unit_cost(problem.budget.metric)
    if not config.experts and not config.dense:     # no statistics (a dense model): ilp's 4^-bits prior
        prior = damage_table(problem, None)
        config = replace(config, dense=tuple(range(problem.n_units)),
                         damage=tuple(tuple(row[:n]) for row, n in zip(prior, problem.n_levels, strict=True)))
    covered = [u for e in config.experts for u in e] + list(config.dense)
    if sorted(covered) != list(range(problem.n_units)):
        raise PlannerError(f"moe-lp: the statistics must cover each of the {problem.n_units} units exactly once "
                           f"(experts + dense units: {len(covered)}); were they computed for this model and space?")
    costs = expert_costs(config)
    groups: list[tuple[np.ndarray, list[str], list[float]]] = []
    for e, members in enumerate(config.experts):
        m = np.asarray(members)
        ok = [i for i, lv in enumerate(config.levels) if all(lv in problem.levels[u] for u in m)]
        groups.append((m, [config.levels[i] for i in ok], [float(costs[e, i]) for i in ok]))
    row = {u: r for r, u in enumerate(config.dense)}
    tie = {u: problem.ties[u] for u in config.dense if problem.ties and problem.ties[u]}
    done: set[int] = set()
    for u in config.dense:
        if u in done:
            continue
        m = np.array([v for v in config.dense if tie.get(u) and tie.get(v) == tie[u]] or [u])
        done.update(int(v) for v in m)
        shared = [lv for lv in problem.levels[m[0]] if all(lv in problem.levels[v] for v in m)]
        dmg = [sum(config.damage[row[int(v)]][problem.levels[v].index(lv)] for v in m) for lv in shared]
        groups.append((m, shared, dmg))
    members, choice, rows_c, rows_d = [], [], [], []
    for m, ids, dmg in groups:
        if not ids:
            raise PlannerError(f"moe-lp: units {[problem.units[u] for u in m]} share no level id")
        ch = np.array([[problem.levels[u].index(lv) for u in m] for lv in ids], dtype=np.int64)
        c = cost_table[m, ch].sum(axis=1)
        order = np.lexsort((np.arange(len(c)), c))
        members.append(m)
        choice.append(ch[order])
        rows_c.append(c[order])
        rows_d.append(np.asarray(dmg, float)[order])
    width = max(len(r) for r in rows_c)
    C, D = np.full((len(groups), width), np.inf), np.full((len(groups), width), np.inf)
    for i, (c, d) in enumerate(zip(rows_c, rows_d, strict=True)):
        C[i, :len(c)], D[i, :len(d)] = c, d
    n_exp = len(config.experts)
    layer = np.array(list(config.layers) + [-1] * (len(groups) - n_exp))
    return Items(tuple(members), tuple(choice), C, D), layer, n_exp


def _level_of(problem: Problem, items: Items, i: int, o: int) -> str:
    u = int(items.members[i][0])
    return problem.levels[u][int(items.choice[i][o][0])]


def solve(problem: Problem, config: MoeLpConfig) -> np.ndarray:
    """The plan (level index per unit) minimizing total cost within the budget (and the options)."""
    items, layer, n_exp = moe_items(problem, config)
    valid = np.isfinite(items.cost)
    item, opt = np.nonzero(valid)
    n_var = len(item)
    d = items.damage[item, opt] - np.nanmin(np.where(valid, items.damage, np.inf), axis=1)[item]
    d = d / max(float(np.abs(d).max()), 1e-300)            # the objective is O(1) for HiGHS
    limit = problem.budget_total()
    a = items.cost[item, opt]
    one = csr_array((np.ones(n_var), (item, np.arange(n_var))), shape=(len(items.members), n_var))
    # budget rows (cost per variable, limit): the global one, one per MoE layer with `layer_budget`,
    # then one per further limit of the budget (`4.0bits,50%sparsity`, a latency or memory limit)
    numel = np.array([problem.numel[m].sum() for m in items.members], float)
    budgets = [(a, limit)]
    if config.layer_budget:
        for ly in np.unique(layer[:n_exp]):
            m = layer[item] == ly
            budgets.append((np.where(m, a, 0.0), limit * numel[layer == ly].sum() / problem.total_numel))
    for b in problem.budget.also:
        t = problem.unit_cost(b.metric)
        budgets.append((np.array([t[items.members[i], items.choice[i][o]].sum() for i, o in zip(item, opt, strict=True)]),
                        problem.limit(b)))
    scale = np.array([max(abs(lim), 1e-300) for _, lim in budgets])
    A = np.array([row for row, _ in budgets]) / scale[:, None]
    rhs = np.array([lim for _, lim in budgets]) / scale
    mins = []
    for lv, k in config.min_count:
        for ly in np.unique(layer[:n_exp]):
            m = np.array([layer[i] == ly and _level_of(problem, items, i, o) == lv for i, o in zip(item, opt, strict=True)])
            need = min(k, int((layer == ly).sum()))
            if need:
                if not m.any():
                    raise PlannerError(f"moe-lp: min_count asks for level {lv!r}, which layer {ly}'s experts lack")
                mins.append((m.astype(float), need))
    for _ in range(8):
        cons = [LinearConstraint(one, 1, 1), LinearConstraint(A, -np.inf, rhs)]
        if mins:
            cons.append(LinearConstraint(np.array([m for m, _ in mins]), np.array([k for _, k in mins], float), np.inf))
        res = milp(d, integrality=np.ones(n_var), bounds=Bounds(0, 1), constraints=cons, options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise PlannerError(f"moe-lp: no plan meets the budget {problem.budget} with these options")
        chosen = np.zeros(len(items.members), dtype=np.int64)
        picked = np.flatnonzero(res.x > 0.5)
        chosen[item[picked]] = opt[picked]
        spent = np.array([float(row[picked].sum()) for row, _ in budgets])
        over = spent - np.array([b for _, b in budgets]) * (1 + _REL_TOL)
        if (over <= 0).all():
            return items.to_x(chosen, problem.n_units)
        rhs = rhs - 2 * np.maximum(over, 0) / scale          # HiGHS's tolerance overshot: tighten, solve again
    raise PlannerError(f"moe-lp: could not meet the budget {problem.budget} within HiGHS's tolerance")


def objective(problem: Problem, config: MoeLpConfig, x) -> float:
    """Total cost of plan x under the program (x must give each expert's matrices one level)."""
    items, _, _ = moe_items(problem, config)
    return items.damage_of(items.options_of(x))


@register("moe-lp", MoeLpConfig)
class MoeLpSearcher(FixedPlans):
    """MC-MoE allocation: one level per expert from routing statistics and output errors, and the
    dense units, under one budget (one integer program, HiGHS); the plan is measured once."""

    method = "moe-lp"

    def __init__(self, problem: Problem, config: MoeLpConfig, seed: int):
        self.problem, self.config = problem, config
        x = solve(problem, config)
        c = config
        label = f"moe-lp {c.cost}" + (f" a={c.a:g} b={c.b:g}" if c.cost in (Cost.FULL.value, Cost.FREQUENCY.value) else "")
        self.plans = [(tuple(int(v) for v in x), objective(problem, config, x), label)]
        self._seed(seed)
        self.results = None
