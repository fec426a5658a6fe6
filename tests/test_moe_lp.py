"""The MC-MoE integer program (`moe-lp`) on synthetic problems: equal to brute force (hypothesis),
plans within the global budget exactly as the Problem accounts it, one level per expert, the
ablations and options doing what they say. No torch: statistics are data."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.budget import Budget, Metric
from planner.errors import PlannerError
from planner.problem import Problem
from planner.search import make_config, make_searcher
from planner.search.moe_lp import MoeLpConfig, expert_costs, objective, solve

BITS = (2, 3, 4)
LEVELS = tuple(f"gptq-b{b}" for b in BITS)


def moe_problem(n_layers: int, n_experts: int, n_dense: int, budget: float, metric: Metric = Metric.BITS,
                ties: bool = False) -> tuple[Problem, list[list[int]], list[int], list[int]]:
    """Units: per layer, n_experts experts of two matrices (gate_up 2x the size of down), then the
    dense units; stored bits carry a per-group overhead. Returns (problem, experts, layers, dense)."""
    units, numel, kinds, blocks, experts, layers, dense = [], [], [], [], [], [], []
    for ly in range(n_layers):
        for e in range(n_experts):
            experts.append([len(units), len(units) + 1])
            layers.append(ly)
            for kind, n in (("experts.gate_up_proj", 2 * 512), ("experts.down_proj", 512)):
                units.append(f"l{ly}.e{e}.{kind}")
                numel.append(n)
                kinds.append(kind)
                blocks.append(ly)
    for d in range(n_dense):
        dense.append(len(units))
        units.append(f"dense{d}")
        numel.append(256 * (d + 1))
        kinds.append("q_proj" if d % 2 else "k_proj")
        blocks.append(d % max(n_layers, 1))
    n = np.array(numel, dtype=np.int64)
    code = n[:, None] * np.array(BITS, float)[None, :]
    stored = code + n[:, None] * 0.5
    tie = tuple(("t" if ties and u in dense[:2] else "") for u in range(len(units)))
    p = Problem(units=tuple(units), numel=n, levels=tuple(LEVELS for _ in units), code_bits=code, stored_bits=stored,
                budget=Budget(budget, metric), kinds=tuple(kinds), blocks=tuple(blocks), ties=tie)
    return p, experts, layers, dense


def config_for(rng: np.random.Generator, experts, layers, dense, **kw) -> MoeLpConfig:
    E = len(experts)
    err = np.sort(rng.lognormal(0, 1, (E, len(LEVELS))), axis=1)[:, ::-1] * 4.0 ** -np.arange(len(LEVELS))
    dmg = np.sort(rng.lognormal(0, 1, (len(dense), len(LEVELS))), axis=1)[:, ::-1]
    freq = rng.dirichlet(np.ones(E)) * 2
    return MoeLpConfig(experts=tuple(tuple(e) for e in experts), layers=tuple(layers),
                       frequency=tuple(freq), weight=tuple(rng.uniform(0.2, 0.8, E)), levels=LEVELS,
                       error=tuple(map(tuple, err)), dense=tuple(dense), damage=tuple(map(tuple, dmg)), **kw)


def brute_force(problem: Problem, config: MoeLpConfig) -> float:
    """Minimum total cost over every plan with one level per expert (and per tie group)."""
    costs = expert_costs(config)
    tied = [u for u in config.dense if problem.ties and problem.ties[u]]
    free = [u for u in config.dense if u not in tied]
    dims = [len(LEVELS)] * (len(config.experts) + len(free) + (1 if tied else 0))
    best = np.inf
    for combo in itertools.product(*(range(d) for d in dims)):
        x = np.zeros(problem.n_units, dtype=np.int64)
        total = 0.0
        for e, lv in enumerate(combo[:len(config.experts)]):
            x[list(config.experts[e])] = lv
            total += costs[e, lv]
        rest = list(combo[len(config.experts):])
        for u in free:
            x[u] = rest.pop(0)
        if tied:
            x[tied] = rest.pop(0)
        for r, u in enumerate(config.dense):
            total += config.damage[r][x[u]]
        if not problem.feasible(x) or not _options_hold(problem, config, x):
            continue
        best = min(best, total)
    return best


def _options_hold(problem: Problem, config: MoeLpConfig, x) -> bool:
    layers = np.asarray(config.layers)
    lv = np.array([x[e[0]] for e in config.experts])
    for ly in np.unique(layers):
        m = layers == ly
        if config.layer_budget:
            units = [u for e in np.flatnonzero(m) for u in config.experts[e]]
            spend = problem.unit_cost(problem.budget.metric)[units, x[units]].sum()
            if spend > problem.budget_total() * problem.numel[units].sum() / problem.total_numel * (1 + 1e-12):
                return False
        for level, k in config.min_count:
            if (lv[m] == LEVELS.index(level)).sum() < min(k, m.sum()):
                return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), frac=st.floats(0.05, 0.95), metric=st.sampled_from([Metric.BITS, Metric.BPW]),
       layer_budget=st.booleans(), min2=st.integers(0, 2), ties=st.booleans(),
       cost=st.sampled_from(["full", "frequency", "error"]), a=st.floats(0, 2), b=st.floats(0, 2))
def test_integer_program_equals_brute_force(seed, frac, metric, layer_budget, min2, ties, cost, a, b):
    rng = np.random.default_rng(seed)
    lo, hi = (2.0, 4.0) if metric is Metric.BITS else (2.5, 4.5)
    problem, experts, layers, dense = moe_problem(2, 3, 3, lo + frac * (hi - lo), metric, ties=ties)
    config = config_for(rng, experts, layers, dense, layer_budget=layer_budget, cost=cost, a=a, b=b,
                        min_count=((LEVELS[0], min2),) if min2 else ())
    expected = brute_force(problem, config)
    try:
        x = solve(problem, config)
    except PlannerError:
        assert expected == np.inf          # infeasible options: brute force agrees
        return
    assert problem.feasible(x) and _options_hold(problem, config, x)
    for e in experts:
        assert len(set(x[e])) == 1          # one level per expert
    if ties:
        assert x[dense[0]] == x[dense[1]]
    assert objective(problem, config, x) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("metric,budget", [(Metric.BITS, 3.0), (Metric.BPW, 3.1), (Metric.BYTES, 24_000.0)])
def test_plan_meets_the_global_budget_as_accounted(metric, budget):
    problem, experts, layers, dense = moe_problem(4, 8, 6, budget, metric)
    config = config_for(np.random.default_rng(0), experts, layers, dense)
    x = solve(problem, config)
    assert problem.spend(x) <= problem.budget_total() * (1 + 1e-12)
    assert problem.cost(x).value(metric) <= budget * (1 + 1e-12)
    cheapest = problem.unit_cost(metric).min(axis=1)
    steps = problem.unit_cost(metric)[:, 1] - cheapest
    assert problem.budget_total() - problem.spend(x) < 3 * steps.max()    # little slack left


def test_cost_variants():
    rng = np.random.default_rng(3)
    problem, experts, layers, dense = moe_problem(2, 4, 2, 3.0)
    base = config_for(rng, experts, layers, dense)
    full, err, freq = (expert_costs(MoeLpConfig(**{**base.__dict__, "cost": c})) for c in ("full", "error", "frequency"))
    f, w, e = np.array(base.frequency), np.array(base.weight), np.array(base.error)
    physical = (f * w**2)[:, None] * e
    for costs in (full, err, freq):
        for ly in (0, 1):       # rescaled: at the cheapest level a layer's total is the physical one
            m = np.array(layers) == ly
            assert costs[m, 0].sum() == pytest.approx(physical[m, 0].sum(), rel=1e-12)
    m = np.array(layers) == 0
    assert np.allclose(err[m] / err[m, :1], e[m] / e[m, :1])                  # error only: frequency ignored
    ratio = freq[m] / (f[m] * w[m])[:, None]                                   # frequency only: one error profile
    assert np.allclose(ratio, ratio[:1])
    a0 = expert_costs(MoeLpConfig(**{**base.__dict__, "a": 0.0, "b": 0.0}))
    assert np.allclose(a0, err)


def test_frequent_experts_get_more_bits():
    problem, experts, layers, dense = moe_problem(1, 4, 0, 3.0)
    config = MoeLpConfig(experts=tuple(map(tuple, experts)), layers=tuple(layers), frequency=(1.4, 0.4, 0.15, 0.05),
                         weight=(0.5,) * 4, levels=LEVELS, error=((16.0, 4.0, 1.0),) * 4)
    x = solve(problem, config)
    bits = [x[e[0]] for e in experts]
    assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]
    assert solve(problem, MoeLpConfig(**{**config.__dict__, "min_count": ((LEVELS[2], 2),)}))[experts[1][0]] == 2


def test_searcher_registered_and_json_config():
    problem, experts, layers, dense = moe_problem(2, 3, 2, 3.0)
    cfg = config_for(np.random.default_rng(1), experts, layers, dense)
    as_json = json.loads(json.dumps({k: v for k, v in cfg.__dict__.items()}))
    s = make_searcher("moe-lp", problem, as_json, seed=0)
    (cand,) = s.ask()
    assert problem.feasible(cand.x) and cand.label.startswith("moe-lp full") and cand.predicted is not None
    with pytest.raises(PlannerError, match="cost must be"):
        make_config("moe-lp", {"cost": "bogus"})
    with pytest.raises(PlannerError, match="exactly once"):
        solve(problem, MoeLpConfig(**{**cfg.__dict__, "dense": cfg.dense[:-1], "damage": cfg.damage[:-1]}))
