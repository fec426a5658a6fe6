"""pymoo adapters for the `nsga2` searcher: our budget operators as pymoo operators.

Imported lazily by `search/nsga2.py` (pymoo takes ~0.8 s to import). Every operator gets pymoo's
`random_state` (a numpy Generator seeded per generation by the searcher) and hands it to the
shared operators in `search/operators.py`, so the level-order moves and the budget repair are the
same ones evo uses.
"""

from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.duplicate import DuplicateElimination
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem as PymooProblem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.ux import UniformCrossover

from planner.problem import Problem
from planner.search.operators import level_step, level_switch, n_switches, repair


class LevelProblem(PymooProblem):
    """Bounds and sizes only: pymoo never evaluates it (the searcher's tell sets F and G).

    One inequality constraint marks failed evaluations (G = 1), which survival ranks last."""

    def __init__(self, problem: Problem, n_obj: int):
        super().__init__(n_var=problem.n_units, n_obj=n_obj, n_ieq_constr=1, xl=np.zeros(problem.n_units),
                         xu=(problem.n_levels - 1).astype(float), vtype=int)


class BudgetRepair(Repair):
    """`operators.repair`: clip to each ladder, lower to the budget; fill the slack only when asked
    (single objective), else plans below the budget stay (the front spans the sizes)."""

    def __init__(self, problem: Problem, fill: bool):
        super().__init__()
        self.p, self.fill = problem, fill

    def _do(self, _, X, random_state=None, **kwargs):
        return np.array([repair(x, self.p, random_state, fill=self.fill) for x in np.asarray(X)], dtype=np.int64)


class LevelMutation(Mutation):
    """With probability p_trade a budget-neutral `level_switch`, else `level_step` (size moves)."""

    def __init__(self, problem: Problem, fill: bool, p_trade: float, max_switches: int):
        super().__init__(prob=1.0)
        self.p, self.fill, self.p_trade, self.max_switches = problem, fill, p_trade, max_switches

    def _do(self, _, X, random_state=None, **kwargs):
        rng, out = random_state, []
        for x in np.asarray(X, dtype=np.int64):
            k = n_switches(rng, self.max_switches)
            if rng.random() < self.p_trade:
                out.append(level_switch(x, self.p, rng, k, fill=self.fill))
            else:
                out.append(level_step(x, self.p, rng, k))
        return np.array(out, dtype=np.int64)


class SeededSampling(Sampling):
    """The seed plans first, then random plans spread over the size range: each draws a centre
    level and scatters units around it, so the repaired population spans cheap to budget."""

    def __init__(self, problem: Problem, seeds: list[tuple[int, ...]]):
        super().__init__()
        self.p, self.seeds = problem, seeds

    def _do(self, _, n_samples, random_state=None, **kwargs):
        rng, top = random_state, self.p.n_levels - 1
        out = [np.array(x, dtype=np.int64) for x in self.seeds[:n_samples]]
        while len(out) < n_samples:
            centre = rng.uniform(0, top.max())
            out.append(np.clip(np.rint(centre + rng.normal(0.0, 0.75, self.p.n_units)), 0, top).astype(np.int64))
        return np.array(out, dtype=np.int64)


class Unseen(DuplicateElimination):
    """Drops offspring equal to each other, to the population, or to any plan measured before."""

    def __init__(self, seen: set[tuple[int, ...]]):
        super().__init__()
        self.seen = seen

    def _do(self, pop, other, is_duplicate):
        known = set(self.seen)
        if other is not None:
            known |= {tuple(int(v) for v in x) for x in other.get("X")}
        for i, x in enumerate(pop.get("X")):
            t = tuple(int(v) for v in x)
            is_duplicate[i] = t in known
            known.add(t)
        return is_duplicate


def algorithm(problem: Problem, n_obj: int, *, pop_size: int, offspring: int, fill: bool, p_trade: float,
              max_switches: int, crossover: float, seeds: list[tuple[int, ...]], seen: set[tuple[int, ...]],
              seed: int) -> tuple[NSGA2, LevelProblem]:
    """A fresh NSGA2, set up on the problem; the searcher injects its population before asking."""
    pp = LevelProblem(problem, n_obj)
    algo = NSGA2(pop_size=pop_size, n_offsprings=offspring, sampling=SeededSampling(problem, seeds),
                 crossover=UniformCrossover(prob=crossover), mutation=LevelMutation(problem, fill, p_trade, max_switches),
                 repair=BudgetRepair(problem, fill), eliminate_duplicates=Unseen(seen))
    algo.setup(pp, seed=seed, termination=NoTermination(), verbose=False)
    return algo, pp


def population(X, F, G, rank=None, crowding=None) -> Population:
    pop = Population.new("X", np.asarray(X, dtype=np.int64), "F", np.asarray(F, dtype=np.float64),
                         "G", np.asarray(G, dtype=np.float64).reshape(-1, 1))
    if rank is not None:
        pop.set("rank", np.asarray(rank), "crowding", np.asarray(crowding, dtype=np.float64))
    return pop
