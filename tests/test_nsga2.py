"""NSGA-II specifics (the registry contract tests cover feasibility, seeds, failures and resume):
pymoo operators stay inside the ladders, the front spans sizes below the budget, seed plans come
first, nothing is measured twice; and the hypervolume is right."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.budget import Budget, Metric
from planner.search import make_searcher
from planner.search.hypervolume import KL_REF, hypervolume, nondominated, normalize, plans_hypervolume
from tests.test_search_contract import drive, evaluator, toy_problem


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.floats(2.05, 5.0))
def test_pymoo_repair_and_mutation_never_leave_the_ladders(seed, fill, ragged, bits):
    from planner.search.nsga2_pymoo import BudgetRepair, LevelMutation, SeededSampling

    p = toy_problem(Budget(bits, Metric.BITS), ragged=ragged)
    rng = np.random.default_rng(seed)
    wild = rng.integers(-3, 9, size=(8, p.n_units))             # below 0 and past every ladder's top
    fixed = BudgetRepair(p, fill)._do(None, wild, random_state=rng)
    mutated = BudgetRepair(p, fill)._do(None, LevelMutation(p, fill, 0.5, 3)._do(None, fixed, random_state=rng),
                                        random_state=rng)
    sampled = BudgetRepair(p, fill)._do(None, SeededSampling(p, [])._do(None, 8, random_state=rng), random_state=rng)
    for X in (fixed, mutated, sampled):
        assert X.dtype == np.int64 and (X >= 0).all() and (X < p.n_levels).all()
        assert all(p.feasible(x) for x in X)


def test_level_step_moves_one_rung():
    from planner.search.operators import level_step

    p = toy_problem(ragged=True)
    rng = np.random.default_rng(0)
    x = np.full(p.n_units, 2)
    for _ in range(50):
        y = level_step(x, p, rng, 3)
        d = y - x
        assert set(np.unique(d)) <= {-1, 0, 1} and 1 <= np.count_nonzero(d) <= 3
        assert (y < p.n_levels).all() and (y >= 0).all()


def test_front_spans_sizes_below_the_budget_and_nothing_is_measured_twice():
    p = toy_problem()
    s = make_searcher("nsga2", p, {"generations": 8, "pop_size": 16}, seed=1)
    batches = drive(s, p, evaluator(p))
    xs = [c.x for b in batches for c in b]
    assert len(xs) == len(set(xs))
    bits = sorted(p.cost(x).bits for x in xs)
    assert bits[-1] <= 3.0 + 1e-9 and bits[0] < 2.6          # below the budget too, not pushed to it
    hv = [h for _, _, h in s.history]
    assert hv == sorted(hv) and hv[-1] > 0                     # every measured plan counts: never falls
    assert len(hv) == 8 and all(c.generation == g for g, b in enumerate(batches) for c in b)


def test_kl_alone_spends_the_budget_and_seed_plans_come_first():
    p = toy_problem()
    seed_x = tuple([1] * p.n_units)                              # uniform 3 bits: exactly on the budget
    s = make_searcher("nsga2", p, {"generations": 3, "pop_size": 8, "objectives": ["kl"], "init_xs": [seed_x]}, 0)
    first = s.ask()
    assert first[0].x == seed_x
    s.tell(evaluator(p)(first))
    for c in s.ask():
        assert p.cost(c.x).bits > 3.0 - 0.2                      # filled to the budget


def test_hypervolume_2d_and_3d():
    pts = np.array([[0.2, 0.6], [0.5, 0.3], [0.8, 0.1], [0.9, 0.9]])
    # staircase: 0.3*0.4 + 0.3*0.7 + 0.2*0.9
    assert np.isclose(hypervolume(pts), 0.3 * 0.4 + 0.3 * 0.7 + 0.2 * 0.9)
    assert hypervolume(np.array([[1.2, 0.1]])) == 0.0 and hypervolume(np.zeros((0, 2))) == 0.0
    assert list(nondominated(np.array([[1, 1], [1, 1], [2, 0], [2, 2]]))) == [True, False, True, False]
    rng = np.random.default_rng(0)
    P = rng.uniform(0, 1, size=(12, 3))
    probe = rng.uniform(0, 1, size=(100_000, 3))
    covered = np.zeros(len(probe), dtype=bool)
    for q in P:
        covered |= (probe >= q).all(axis=1)
    assert abs(hypervolume(P) - covered.mean()) < 0.006      # Monte Carlo: sd ~0.0016


def test_plans_hypervolume_scale():
    p = toy_problem()
    top = np.full(p.n_units, 1)                                 # 3 bits = the budget: size 1, inside the margin
    low = np.zeros(p.n_units, dtype=int)                        # the cheapest plan: size 0
    assert np.isclose(plans_hypervolume(p, ["kl", "size"], [low], [KL_REF / 10]), 1.1 * (1.1 - 0.75) / 1.21)
    assert np.isclose(plans_hypervolume(p, ["kl", "size"], [top], [0.01]), 0.1 * (1.1 - 0.25) / 1.21)
    assert plans_hypervolume(p, ["kl", "size"], [top], [KL_REF * 100]) == 0.0
    k = normalize(p, (Metric.BITS,), [1e-4, 1.0, KL_REF, float("inf")], [[2.0] * 4])[:, 0]
    assert k[0] == 0.0 and np.isclose(k[1], 0.75) and np.isclose(k[2], 1.0) and np.isinf(k[3])
