"""Exact allocation (multiple-choice knapsack with HiGHS) and the Lagrangian sweep, on small random
instances checked against brute force, with and without tie groups."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.budget import Budget, Metric
from planner.problem import Problem
from planner.rundir import problem_from_json, problem_to_json
from planner.search import make_searcher
from planner.search.ilp import damage_table, exact_plan, make_items, solve_mckp
from planner.search.lagrange import bisect_multiplier, hull_path, relaxed_options
from tests.test_search_contract import drive, evaluator, toy_problem


def random_problem(rng: np.random.Generator, n_units: int, n_levels: int, ragged: bool, ties: bool,
                   frac: float, metric: Metric, second: float | None = None) -> tuple[Problem, np.ndarray]:
    """Units with random sizes and increasing per-level costs; damage falls with the level.
    `second`: a further limit in stored bits per weight (or nominal bits when `metric` is bpw)."""
    numel = rng.integers(1, 50, n_units) * 16
    lens = [int(rng.integers(1, n_levels + 1)) if ragged else n_levels for _ in range(n_units)]
    code = np.full((n_units, n_levels), np.nan)
    stored = np.full((n_units, n_levels), np.nan)
    damage = np.full((n_units, n_levels), np.nan)
    levels, tie_ids = [], tuple(f"g{u // 2}" if ties and u < n_units - 1 else "" for u in range(n_units))
    for u in range(n_units):
        bits = np.sort(rng.choice(np.arange(1, 9), size=lens[u], replace=False))
        if u % 2 and tie_ids[u]:                  # a tied partner: the same level ids, maybe one fewer
            bits = np.array([int(lv[1:]) for lv in levels[u - 1]])
            if ragged and len(bits) > 1:
                bits = np.delete(bits, rng.integers(len(bits)))
            lens[u] = len(bits)
        levels.append(tuple(f"b{b}" for b in bits))
        code[u, :lens[u]] = numel[u] * bits
        stored[u, :lens[u]] = numel[u] * (bits + rng.uniform(0.1, 0.6))
        damage[u, :lens[u]] = np.sort(rng.lognormal(0, 2, lens[u]))[::-1] * numel[u]
    p = Problem(units=tuple(f"u{u}" for u in range(n_units)), numel=numel, levels=tuple(levels), code_bits=code,
                stored_bits=stored, budget=Budget(1.0, metric), ties=tie_ids)
    def limit(m: Metric, f: float) -> Budget:
        cost = p.unit_cost(m)
        lo, hi = np.nanmin(cost, axis=1).sum(), np.nanmax(cost, axis=1).sum()
        total = lo + f * (hi - lo)
        return Budget(total if m is Metric.BYTES else total / p.total_numel, m)

    budget = limit(metric, frac)
    if second is not None:
        budget = Budget(budget.value, metric, (limit(Metric.BITS if metric is Metric.BPW else Metric.BPW, second),))
    p = Problem(units=p.units, numel=numel, levels=p.levels, code_bits=code, stored_bits=stored,
                budget=budget, ties=tie_ids)
    return p, damage


def respects_ties(p: Problem, x) -> bool:
    return all(len({p.levels[u][x[u]] for u in g}) == 1 for g in p.tie_groups())


def brute_force(p: Problem, damage: np.ndarray) -> float:
    best = np.inf
    for x in itertools.product(*[range(n) for n in p.n_levels]):
        if p.feasible(x) and respects_ties(p, x):
            best = min(best, float(damage[np.arange(p.n_units), x].sum()))
    return best


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_units=st.integers(1, 5), n_levels=st.integers(1, 4),
       ragged=st.booleans(), ties=st.booleans(), frac=st.floats(0.0, 1.0),
       metric=st.sampled_from([Metric.BITS, Metric.BPW, Metric.BYTES]), second=st.none() | st.floats(0.0, 1.0))
def test_ilp_equals_brute_force(seed, n_units, n_levels, ragged, ties, frac, metric, second):
    p, damage = random_problem(np.random.default_rng(seed), n_units, n_levels, ragged, ties, frac, metric, second)
    expect = brute_force(p, damage)
    items = make_items(p, damage)
    opts = solve_mckp(items, p.budget_total())
    if not np.isfinite(expect):
        assert opts is None
        return
    x = items.to_x(opts, p.n_units)
    got = float(damage[np.arange(p.n_units), x].sum())
    assert p.feasible(x) and respects_ties(p, x)
    assert got == pytest.approx(expect, rel=1e-6, abs=1e-6 * np.nanmax(np.abs(damage)))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_units=st.integers(1, 6), frac=st.floats(0.0, 1.0), ties=st.booleans())
def test_lagrange_plan_is_optimal_for_its_spend(seed, n_units, frac, ties):
    """A relaxed plan is a knapsack optimum for the budget equal to its own spend (weak duality)."""
    p, damage = random_problem(np.random.default_rng(seed), n_units, 4, False, ties, frac, Metric.BITS)
    items = make_items(p, damage)
    opts = bisect_multiplier(items, p.budget_total())
    if opts is None:
        return
    assert items.spend_of(opts) <= p.budget_total() * (1 + 1e-12)
    exact = solve_mckp(items, items.spend_of(opts))
    assert items.damage_of(opts) == pytest.approx(items.damage_of(exact), rel=1e-6,
                                                  abs=1e-6 * np.nanmax(np.abs(damage)))
    assert respects_ties(p, items.to_x(opts, p.n_units))


def test_relaxed_spend_falls_with_the_multiplier():
    p, damage = random_problem(np.random.default_rng(3), 12, 5, True, True, 0.5, Metric.BPW)
    items = make_items(p, damage)
    spends = [items.spend_of(relaxed_options(items, lam)) for lam in np.geomspace(1e-6, 1e6, 60)]
    assert all(a >= b for a, b in zip(spends, spends[1:], strict=False))


def test_hull_path_is_monotone_and_ends_cheapest():
    p, damage = random_problem(np.random.default_rng(5), 10, 5, True, True, 0.8, Metric.BITS)
    items = make_items(p, damage)
    start = solve_mckp(items, p.budget_total())
    path = hull_path(items, start)
    opts = np.array(start)
    spend, dmg = [items.spend_of(opts)], [items.damage_of(opts)]
    for i, o in path:
        opts[i] = o
        spend.append(items.spend_of(opts))
        dmg.append(items.damage_of(opts))
    assert all(a > b for a, b in zip(spend, spend[1:], strict=False))
    assert np.allclose(spend[-1], np.nanmin(items.cost, axis=1).sum())
    slopes = np.diff(dmg) / -np.diff(spend)
    assert all(a <= b + 1e-9 * abs(b) for a, b in zip(slopes, slopes[1:], strict=False))


@pytest.mark.parametrize("name", ["ilp", "lagrange", "hessian"])
def test_fused_groups_always_share_a_level(name):
    base = toy_problem(Budget(3.3, Metric.BPW), ragged=True)
    ties = tuple(f"{b}.{'attn' if k in ('q_proj', 'k_proj') else 'mlp'}" for b, k in zip(base.blocks, base.kinds,
                                                                                         strict=True))
    p = problem_from_json(json.loads(json.dumps(problem_to_json(Problem(
        units=base.units, numel=base.numel, levels=base.levels, code_bits=base.code_bits,
        stored_bits=base.stored_bits, budget=base.budget, kinds=base.kinds, blocks=base.blocks, ties=ties)))))
    assert p.ties == ties and len(p.tie_groups()) == 12
    table = damage_table(p, None)
    config = {"max_kl": 1.0} if name == "hessian" else {}
    s = make_searcher(name, p, config, seed=0)
    batches = drive(s, p, evaluator(p))
    for c in (c for b in batches for c in b):
        assert respects_ties(p, c.x) and p.feasible(c.x)
        assert c.predicted == pytest.approx(float(table[np.arange(p.n_units), c.x].sum()))
    assert respects_ties(p, s.best())


def test_exact_plan_beats_every_uniform_mix_on_predicted_damage():
    from planner.search.uniform import _orders, greedy_mix, uniform_x

    p = toy_problem(Budget(3.5, Metric.BITS))
    table = damage_table(p, None) * np.random.default_rng(0).lognormal(0, 1, p.n_units)[:, None]
    x = exact_plan(p, table)
    pred = float(table[np.arange(p.n_units), x].sum())
    for order in _orders(p, 0).values():
        mix = greedy_mix(p, 1, order)
        assert pred <= float(table[np.arange(p.n_units), mix].sum()) + 1e-9
    assert pred <= float(table[np.arange(p.n_units), uniform_x(p, 1)].sum())


@pytest.mark.parametrize("name", ["ilp", "lagrange", "hessian"])
def test_every_limit_of_a_joined_budget_holds(name):
    """`3.6bpw,3.0bits`: each limit binds somewhere; every asked plan keeps both."""
    p = toy_problem(Budget(3.6, Metric.BPW, (Budget(3.0, Metric.BITS),)))
    s = make_searcher(name, p, {"max_kl": 1.0} if name == "hessian" else {}, seed=0)
    batches = drive(s, p, evaluator(p))
    cands = [c for b in batches for c in b]
    assert cands and all(p.feasible(c.x) for c in cands)
    assert all(p.cost(c.x).bits <= 3.0 + 1e-9 for c in cands)


def test_problem_json_without_ties_still_loads():
    p = toy_problem()
    d = problem_to_json(p)
    assert "ties" not in d
    assert problem_from_json(d).ties == () and problem_from_json(d).tie_groups() == []
