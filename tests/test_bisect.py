"""The accuracy-target bisection (`--method hessian --max-kl ...`): meets the target within the
path's resolution, in at most ceil(log2 n) + 2 real evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from planner.budget import Budget, Metric
from planner.errors import PlannerError
from planner.search import Candidate, Result, make_searcher
from planner.search.bisect import max_evaluations
from planner.search.ilp import damage_table
from tests.test_search_contract import drive, toy_problem, true_kl


def additive_kl(table: np.ndarray, scale: float = 1.0):
    """A measured KL that is exactly the predicted damage (times `scale`): monotone along the path."""
    def evaluate(cands: list[Candidate]) -> list[Result]:
        out = []
        for c in cands:
            kl = scale * float(np.nansum(table[np.arange(len(c.x)), c.x]))
            out.append(Result(c, kl=kl, ppl=math.exp(min(kl, 700.0))))
        return out
    return evaluate


@pytest.mark.parametrize("target_frac", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("budget", [Budget(8.0, Metric.BITS), Budget(3.6, Metric.BPW)])
def test_bisection_meets_the_target_in_log_evaluations(target_frac, budget):
    p = toy_problem(budget, ragged=True)
    table = damage_table(p, None)
    probe = make_searcher("hessian", p, {"max_kl": 1e9}, seed=0)
    preds = probe.predicted
    lo, hi = preds[0], preds[-1]
    target = lo + target_frac * (hi - lo)
    s = make_searcher("hessian", p, {"max_kl": target}, seed=0)
    n = len(s.path) - 1
    batches = drive(s, p, additive_kl(table))
    assert sum(len(b) for b in batches) <= max_evaluations(n) == math.ceil(math.log2(n)) + 2
    k = s.path.index(s.best())
    assert s.met and preds[k] <= target                          # meets the target ...
    assert k == n or preds[k + 1] > target                       # ... and the next plan on the path does not
    assert all(len(b) == 1 and p.feasible(b[0].x) for b in batches)


def test_unreachable_target_returns_the_budget_plan_after_one_evaluation():
    p = toy_problem(Budget(3.0, Metric.BITS))
    s = make_searcher("hessian", p, {"max_kl": 0.0}, seed=0)
    batches = drive(s, p, additive_kl(damage_table(p, None)))
    assert len(batches) == 1 and not s.met and s.best() == s.path[0]


def test_ppl_target_uses_the_base_perplexity():
    p = toy_problem(Budget(8.0, Metric.BITS))
    table = damage_table(p, None)
    s = make_searcher("hessian", p, {"max_ppl_increase": 0.02, "base_ppl": 1.0}, seed=0)
    scale = 1.0 / p.total_numel                                  # mean squared error per weight: 0.06 .. 1.5e-5
    drive(s, p, additive_kl(table, scale))
    k = s.path.index(s.best())
    ppl = [math.exp(scale * d) for d in s.predicted]
    assert s.met and ppl[k] <= 1.02 and (k == len(s.path) - 1 or ppl[k + 1] > 1.02) and 0 < k < len(s.path) - 1
    with pytest.raises(PlannerError, match="base_ppl"):
        make_searcher("hessian", p, {"max_ppl_increase": 0.02})
    with pytest.raises(PlannerError, match="one target"):
        make_searcher("hessian", p, {"max_kl": 0.1, "max_ppl_increase": 0.02, "base_ppl": 1.0})


def test_noisy_non_additive_fitness_still_meets_the_target():
    """On the contract tests' non-additive fitness the found plan is measured within the target."""
    p = toy_problem(Budget(6.0, Metric.BITS))
    calls = []

    def evaluate(cands):
        calls.append(len(cands))
        return [Result(c, kl=true_kl(p, c.x), ppl=1.0) for c in cands]

    s = make_searcher("hessian", p, {"max_kl": 2.0}, seed=0)
    drive(s, p, evaluate)
    assert s.met and true_kl(p, s.best()) <= 2.0
    assert sum(calls) <= max_evaluations(len(s.path) - 1)
    assert p.cost(s.best()).bits < 6.0


def test_failures_count_as_misses():
    p = toy_problem(Budget(8.0, Metric.BITS))
    s = make_searcher("hessian", p, {"max_kl": 1e9}, seed=0)
    drive(s, p, lambda cands: [Result(c, error="boom") for c in cands])
    assert not s.met and s.best() == s.path[0]
