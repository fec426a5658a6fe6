"""NSGA-II over integer level vectors (pymoo's algorithm, driven by ask/tell).

pymoo does one generation's work: binary tournaments on rank and crowding, uniform crossover
(each unit's level from one parent), our mutation (budget-neutral `level_switch` or size-moving
`level_step`), our budget repair, and survival by rank and crowding (`search/nsga2_pymoo.py`).
We keep the state: pymoo objects are not JSON, so the population (x, objectives, rank, crowding),
the pending offspring, the rng and every measured plan are plain lists, and a fresh pymoo
algorithm is rebuilt around them, from a seed stored in the state, for each ask and each tell.

Objectives: KL (on a log scale) plus sizes (bits, bpw, bytes, or `size` = the budget's metric).
With a size the budget is an upper bound and the repair keeps plans below it, so the front runs
from the cheapest plan to the budget; with KL alone it is a genetic algorithm at the budget.
Every plan is measured on one fixed batch (`tokens`, seed derived from the run seed), so KLs of
different generations compare, and a plan measured once is never asked again. Generation 0 is the
initial population (seed plans first); each later generation breeds `offspring` plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Fidelity, Result, derive_seed, register
from planner.search.hypervolume import parse_objectives, plans_hypervolume, setup
from planner.search.operators import repair

X = tuple[int, ...]
_SEED_PATH = 0x45A2         # nsga2's data-seed path, apart from uniform's and evo's
_FAILED_F = 1e9             # objective value stored for a failed evaluation (G = 1 ranks it last anyway)


@dataclass(frozen=True)
class NSGA2Config:
    generations: int = 20          # batches, the initial population included
    pop_size: int = 24
    offspring: int | None = None   # plans bred per generation (default pop_size)
    tokens: int = 1024             # the fixed batch every plan is measured on
    objectives: tuple[str, ...] = ("kl", "size")
    init_xs: tuple[tuple[int, ...], ...] = ()   # seed plans (uniform, evo, hessian ...), repaired to the budget
    max_switches: int = 3
    p_trade: float = 0.5           # mutation: budget-neutral level switch with this probability, else level steps
    crossover: float = 0.9         # probability that a mating crosses over (else the offspring copy their parents)

    def __post_init__(self) -> None:
        if self.generations < 1 or self.pop_size < 2 or self.tokens < 1 or self.max_switches < 1:
            raise PlannerError("nsga2: generations >= 1, pop_size >= 2, tokens >= 1 and max_switches >= 1 are required")
        if self.offspring is not None and self.offspring < 1:
            raise PlannerError(f"nsga2: offspring must be >= 1, got {self.offspring}")
        if not (0 <= self.p_trade <= 1 and 0 <= self.crossover <= 1):
            raise PlannerError("nsga2: p_trade and crossover are probabilities in [0, 1]")
        parse_objectives(self.objectives)


def objective_row(problem: Problem, metrics, x, kl: float) -> list[float]:
    """F of one plan: log10 KL (failed: a large constant), then its sizes."""
    c = problem.cost(x)
    k = math.log10(max(kl, 1e-12)) if math.isfinite(kl) else _FAILED_F
    return [k, *(c.value(m) for m in metrics)]


@register("nsga2", NSGA2Config)
class NSGA2Searcher:
    """NSGA-II (pymoo) on KL and size: a Pareto front within the budget, or a GA at it."""

    method = "nsga2"

    def __init__(self, problem: Problem, config: NSGA2Config, seed: int):
        self.config = config
        self.objectives, self.metrics, self.fusion, self.init_xs = setup("nsga2", problem, config.objectives,
                                                                         config.init_xs)
        self.problem = self.fusion.inner      # tie groups are one unit here; candidates name every member
        self.fill = not self.metrics            # KL alone: plans should spend the budget
        self._seed(seed)
        self.rng = np.random.default_rng(seed)
        self.generation = 0
        self.gen_seed = 0
        self.pop: dict | None = None          # {"x", "f", "g", "rank", "crowding"}: lists after a tell
        self.pending: list[X] | None = None
        self.measured: dict[X, float] = {}    # every plan told, with its KL (inf: failed)
        self.history: list[tuple[int, float, float]] = []   # (generation, best KL within budget, hypervolume)

    def _seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.fidelity = Fidelity(tokens=self.config.tokens, seed=derive_seed(seed, _SEED_PATH))

    # --- pymoo ---------------------------------------------------------------------------
    def _algorithm(self):
        from planner.search import nsga2_pymoo

        c = self.config
        seeds = []
        for x in self.init_xs:     # repaired with their own rng: seeding never shifts the main stream
            t = tuple(int(v) for v in repair(x, self.problem, np.random.default_rng(self.seed), fill=self.fill))
            if t not in seeds:
                seeds.append(t)
        algo, pp = nsga2_pymoo.algorithm(
            self.problem, 1 + len(self.metrics), pop_size=c.pop_size, offspring=c.offspring or c.pop_size,
            fill=self.fill, p_trade=c.p_trade, max_switches=c.max_switches, crossover=c.crossover, seeds=seeds,
            seen=set(self.measured), seed=self.gen_seed)
        if self.pop is not None:
            p = self.pop
            algo.pop = nsga2_pymoo.population(p["x"], p["f"], p["g"], p["rank"], p["crowding"])
            algo.is_initialized, algo.n_iter = True, self.generation
        return algo, nsga2_pymoo

    # --- ask / tell ------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """This generation's unmeasured plans; asking again before `tell` returns the same batch."""
        if self.done():
            return []
        if self.pending is None:
            self.gen_seed = int(self.rng.integers(2**63))
            algo, _ = self._algorithm()
            off = algo.ask()
            xs = [] if off is None else [tuple(int(v) for v in x) for x in off.get("X")]
            self.pending = list(dict.fromkeys(x for x in xs if x not in self.measured))
        g = self.generation
        return [Candidate(self.fusion.to_outer(x), self.fidelity, method=self.method, generation=g) for x in self.pending]

    def tell(self, results: list[Result]) -> None:
        if self.pending is None:
            raise PlannerError("nsga2: tell() before ask()")
        kl = {self.fusion.to_inner(r.candidate.x): (r.kl if r.ok else math.inf) for r in results}
        for x in self.pending:
            self.measured[x] = kl.get(x, math.inf)
        if self.pending:
            algo, glue = self._algorithm()
            F = [objective_row(self.problem, self.metrics, x, self.measured[x]) for x in self.pending]
            G = [0.0 if math.isfinite(self.measured[x]) else 1.0 for x in self.pending]
            algo.tell(infills=glue.population(self.pending, F, G))
            pop = algo.pop          # failed plans survive unranked (survival sorts them by G): rank them last
            self.pop = {"x": pop.get("X").astype(int).tolist(), "f": pop.get("F").tolist(),
                        "g": pop.get("G").ravel().tolist(),
                        "rank": [10**9 if r is None else int(r) for r in pop.get("rank")],
                        "crowding": [0.0 if c is None else float(c) for c in pop.get("crowding")]}
        best = self._best()
        self.history.append((self.generation, self.measured[best] if best else math.inf, self.hypervolume()))
        self.generation += 1
        self.pending = None

    def done(self) -> bool:
        return self.generation >= self.config.generations

    def _best(self) -> X | None:
        ok = [(k, x) for x, k in self.measured.items() if math.isfinite(k) and self.problem.feasible(x)]
        return min(ok)[1] if ok else None

    def best(self) -> X | None:
        """The lowest KL measured within the budget."""
        best = self._best()
        return None if best is None else self.fusion.to_outer(best)

    def hypervolume(self) -> float:
        ok = [(x, k) for x, k in self.measured.items() if math.isfinite(k) and self.problem.feasible(x)]
        return plans_hypervolume(self.problem, self.objectives, [x for x, _ in ok], [k for _, k in ok])

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "generation": self.generation, "gen_seed": self.gen_seed,
                "rng": self.rng.bit_generator.state, "pop": self.pop,
                "pending": None if self.pending is None else [list(x) for x in self.pending],
                "measured": [[list(x), k] for x, k in self.measured.items()],
                "objectives": [o.value for o in self.objectives],
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if [o.value for o in self.objectives] != state.get("objectives", [o.value for o in self.objectives]):
            raise PlannerError(f"nsga2: the checkpoint optimizes {state['objectives']}, this config "
                               f"{[o.value for o in self.objectives]}: resume with the same objectives")
        self._seed(state["seed"])
        self.generation, self.gen_seed = int(state["generation"]), int(state["gen_seed"])
        self.rng.bit_generator.state = state["rng"]
        self.pop = state["pop"]
        self.pending = None if state["pending"] is None else [tuple(int(v) for v in x) for x in state["pending"]]
        self.measured = {tuple(int(v) for v in x): float(k) for x, k in state["measured"]}
        self.history = [(int(g), float(b), float(h)) for g, b, h in state["history"]]

