"""`hessian`: the most compressed plan that meets an accuracy target, in O(log n) real evaluations.

Units are ranked by predicted damage (a sensitivity score x each level's error, given as data):
starting from the exact knapsack plan at the budget (`ilp.exact_plan`), the ranked path lowers one
item one hull step at a time, cheapest damage per saved bit first (`lagrange.hull_path`). Measured
KL grows along it, so a bisection over the path index finds the last plan within the target:

    evaluate path[0]   (fails: the target is out of reach within the budget; path[0] is returned)
    evaluate path[n]   (meets: nothing cheaper exists; done)
    bisect (ok, fail) until they are adjacent: ceil(log2 n) more evaluations

Targets: `max_kl` (mean KL per token on the search fidelity) or `max_ppl_increase` (relative, e.g.
0.02; needs `base_ppl`, the unmodified model's perplexity on the same fidelity, which the pipeline
measures). Without a target the searcher measures the exact plan at the budget and stops.
All evaluations share one fidelity (same windows), so the comparisons along the path are paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Result, register
from planner.search.ilp import IlpConfig, damage_table, make_items, proxy_fidelity, solve_mckp
from planner.search.lagrange import hull_path


@dataclass(frozen=True)
class BisectConfig(IlpConfig):
    tokens: int = 4096                  # tokens per evaluation (one fixed batch for all of them)
    max_kl: float | None = None         # target: KL <= max_kl
    max_ppl_increase: float | None = None   # target: ppl <= base_ppl * (1 + max_ppl_increase)
    base_ppl: float | None = None       # the unmodified model's ppl on this searcher's fidelity

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_kl is not None and self.max_ppl_increase is not None:
            raise PlannerError("hessian: give one target, max_kl or max_ppl_increase, not both")
        if self.max_kl is not None and self.max_kl < 0 or self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise PlannerError("hessian: targets must be >= 0")


@register("hessian", BisectConfig)
class BisectSearcher:
    """Sensitivity-ranked bisection to the most compressed plan that meets a KL or ppl target."""

    method = "hessian"

    def __init__(self, problem: Problem, config: BisectConfig, seed: int):
        self.problem, self.config = problem, config
        if config.max_ppl_increase is not None and config.base_ppl is None:
            raise PlannerError("hessian: max_ppl_increase needs base_ppl (the pipeline measures it)")
        items = make_items(problem, damage_table(problem, config.damage))
        start = solve_mckp(items, problem.budget_total())
        if start is None:
            raise PlannerError(f"hessian: no plan meets the budget {problem.budget}")
        path = hull_path(items, start) if self.targeted else []
        opts = [np.array(start)]
        for i, o in path:                  # plan k = plan k-1 with one more hull step
            opts.append(opts[-1].copy())
            opts[-1][i] = o
        self.path = [tuple(int(v) for v in items.to_x(o, problem.n_units)) for o in opts]
        self.predicted = [items.damage_of(o) for o in opts]
        self._seed(seed)
        self.ok: int | None = None        # largest path index measured within the target
        self.fail: int | None = None      # smallest path index measured over it
        self.measured: dict[int, float] = {}

    @property
    def targeted(self) -> bool:
        return self.config.max_kl is not None or self.config.max_ppl_increase is not None

    def _seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.fidelity = proxy_fidelity(self.config.tokens, seed)

    def _meets(self, r: Result) -> bool:
        if not r.ok:
            return False
        c = self.config
        if c.max_kl is not None:
            return r.kl <= c.max_kl
        if c.max_ppl_increase is not None:
            return r.ppl <= c.base_ppl * (1 + c.max_ppl_increase)
        return True

    def _next(self) -> int | None:
        n = len(self.path) - 1
        if 0 not in self.measured:
            return 0
        if self.ok is None or self.ok == n:
            return None                    # start misses the target, or the cheapest plan meets it
        if self.fail is None:
            return n
        return None if self.fail - self.ok <= 1 else (self.ok + self.fail) // 2

    def ask(self) -> list[Candidate]:
        k = self._next()
        if k is None:
            return []
        n = len(self.path) - 1
        return [Candidate(self.path[k], self.fidelity, method=self.method, generation=len(self.measured),
                          label=f"path {k}/{n}", predicted=self.predicted[k])]

    def tell(self, results: list[Result]) -> None:
        k = self._next()
        if k is None:
            return
        r = next((r for r in results if tuple(r.candidate.x) == self.path[k]), None)
        self.measured[k] = r.kl if r is not None and r.ok else math.inf
        if r is not None and self._meets(r):
            self.ok = k if self.ok is None else max(self.ok, k)
        else:
            self.fail = k if self.fail is None else min(self.fail, k)

    def done(self) -> bool:
        return self._next() is None

    @property
    def met(self) -> bool:
        """Whether the returned plan was measured within the target."""
        return self.ok is not None

    def best(self) -> tuple[int, ...] | None:
        return self.path[self.ok if self.ok is not None else 0]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "ok": self.ok, "fail": self.fail,
                "measured": [[k, v] for k, v in sorted(self.measured.items())]}

    def load_state_dict(self, state: dict) -> None:
        self._seed(state["seed"])
        self.ok, self.fail = state["ok"], state["fail"]
        self.measured = {int(k): float(v) for k, v in state["measured"]}


def max_evaluations(n_steps: int) -> int:
    """Upper bound on evaluations for a path of n_steps steps: ceil(log2 n) + 2."""
    return 1 if n_steps == 0 else 2 + math.ceil(math.log2(n_steps))
