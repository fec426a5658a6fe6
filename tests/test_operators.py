"""Property tests for the budget operators, plus: evo beats the best uniform mix on the toy problem."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.budget import HARDWARE, Budget, Metric
from planner.errors import PlannerError
from planner.search import make_config, make_searcher
from planner.search.operators import fill_uniform, level_switch, n_switches, repair
from tests.test_search_contract import drive, evaluator, toy_problem, true_kl


def _problem(metric: Metric, frac: float, ragged: bool):
    """A toy problem whose budget lies `frac` of the way from the cheapest to the dearest plan."""
    p = toy_problem(ragged=ragged)
    c = np.nan_to_num(p.unit_cost(metric), nan=-np.inf)
    lo, hi = float(c[:, 0].sum()), float(c.max(axis=1).sum())
    total = lo + frac * (hi - lo)
    value = total if metric is Metric.BYTES else total / p.total_numel
    return toy_problem(Budget(value, metric), ragged=ragged)


problems = st.builds(_problem, st.sampled_from([m for m in Metric if m not in HARDWARE]), st.floats(0.0, 1.0), st.booleans())
seeds = st.integers(0, 2**32 - 1)


def _in_ladder(p, x) -> bool:
    return bool(((x >= 0) & (x < p.n_levels)).all())


def _saturated(p, x) -> bool:
    """No single one-step raise fits any more: repair filled the slack."""
    for u in np.flatnonzero(x < p.n_levels - 1):
        y = x.copy()
        y[u] += 1
        if p.feasible(y):
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(problems, seeds)
def test_repair_is_feasible_in_ladder_and_saturated(p, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, p.n_levels)                  # anywhere on the ladders, often over budget
    frozen = rng.choice(p.n_units, size=3, replace=False)
    y = repair(x, p, rng, frozen=frozen)
    assert _in_ladder(p, y) and p.feasible(y) and _saturated(p, y)
    x2 = x.copy()
    repair(x2, p, rng)
    assert (x2 == x).all()


@settings(max_examples=60, deadline=None)
@given(problems, seeds, st.integers(1, 6), st.booleans())
def test_level_switch_stays_in_budget_and_ladder(p, seed, k, same_size):
    rng = np.random.default_rng(seed)
    x = repair(rng.integers(0, p.n_levels), p, rng)
    y = level_switch(x, p, rng, k, same_size_only=same_size)
    assert _in_ladder(p, y) and p.feasible(y)
    if same_size:
        assert p.spend(y) == pytest.approx(p.spend(x), rel=1e-12)
        assert np.abs(y - x).sum() <= 2 * k


@settings(max_examples=60, deadline=None)
@given(problems, seeds, st.integers(1, 3))
def test_local_repair_stays_in_budget_and_ladder(p, seed, k):
    """Local repair: feasible and saturated like the plain one."""
    rng = np.random.default_rng(seed)
    x = fill_uniform(p, rng)
    y = level_switch(x, p, rng, k, local=True)
    assert _in_ladder(p, y) and p.feasible(y) and (p.budget.also or _saturated(p, y))


def test_local_repair_keeps_the_parents_prefix():
    """On the toy problem the first changed block of local offspring is deeper on average: the
    prefix cache skips more of each offspring."""
    p = toy_problem()
    blocks = np.asarray(p.blocks)

    def first_block(local: bool) -> float:
        rng = np.random.default_rng(0)
        x = fill_uniform(p, rng)
        firsts = [blocks[np.flatnonzero(y != x)].min() for y in (level_switch(x, p, rng, 1, local=local)
                                                              for _ in range(300)) if (y != x).any()]
        return float(np.mean(firsts))

    assert first_block(True) > first_block(False)


@settings(max_examples=30, deadline=None)
@given(problems, seeds)
def test_fill_uniform_is_feasible_and_saturated(p, seed):
    x = fill_uniform(p, np.random.default_rng(seed))
    assert _in_ladder(p, x) and p.feasible(x) and _saturated(p, x)


def test_n_switches_in_range_and_biased_small():
    rng = np.random.default_rng(0)
    draws = [n_switches(rng, 3) for _ in range(2000)]
    assert set(draws) == {1, 2, 3}
    assert draws.count(1) > draws.count(2) > draws.count(3)


def test_cross_size_switch_moves_bits_between_sizes():
    """Without same_size_only, big and small units trade: the spend split between sizes changes."""
    p = toy_problem()
    rng = np.random.default_rng(0)
    x = fill_uniform(p, rng)
    small = p.numel < p.numel.max()
    shares = set()
    for _ in range(50):
        y = level_switch(x, p, rng, 1)
        shares.add(round(float((p.code_bits[np.arange(p.n_units), y] * small).sum()), 3))
    assert len(shares) > 2


def test_config_errors_are_one_clear_line():
    with pytest.raises(PlannerError, match="unknown search method 'evoo'"):
        make_config("evoo", {})
    with pytest.raises(PlannerError, match="unknown evo config key.*generatoins"):
        make_config("evo", {"generatoins": 3})
    with pytest.raises(PlannerError, match="evo.generations must be int"):
        make_config("evo", {"generations": "3"})
    with pytest.raises(PlannerError, match="stages"):
        make_config("evo", {"stages": [[4]]})
    cfg = make_config("evo", {"stages": [[4, 512], [1, 2048]], "init_x": None})
    assert cfg.stages == ((4, 512), (1, 2048))
    hash(cfg)


def test_evo_beats_best_uniform_mix():
    p = toy_problem(Budget(3.5, Metric.BITS))        # between two levels: the mixes are real
    uni = make_searcher("uniform", p, {}, seed=0)
    batches = drive(uni, p, evaluator(p))
    assert sum(c.label.startswith("mix 1/2 ") for c in batches[0]) >= 3
    best_uniform = min(true_kl(p, c.x) for c in batches[0])
    evo = make_searcher("evo", p, {"generations": 60, "offspring": 8, "stages": [[2, 256], [1, 1024]]}, seed=0)
    drive(evo, p, evaluator(p))
    assert p.feasible(evo.best())
    assert true_kl(p, evo.best()) < 0.6 * best_uniform
