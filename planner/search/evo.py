"""EvoPress-style (1+lambda) evolution with racing over fresh batches.

Each generation: lambda offspring by `level_switch` from the parent; stage k measures the
survivors of stage k-1 on a fresh batch (seed derived from run seed, generation, stage) and keeps
the best `survivors`; in the last stage the parent is re-measured on the same batch, so the
comparison that replaces it is a paired one and a lucky early measurement cannot stick.

With a warm start, a last check guards it: after the final generation the parent and the warm-start
plan are measured side by side on `final_batches` fresh batches of the last stage's size, and the
warm start is returned if it wins. Short racing stages on a plan that is already near-optimal (a
Hessian or MC-MoE allocation) can drift below it on noise; the check makes evo never return a plan
that measures worse than the one it was given, at a cost of 2 x final_batches evaluations.

With `screen` > 1 (and a sensitivity's `damage` rows) each generation breeds screen x offspring and
races the `offspring` whose summed predicted damage is least: measured evaluations go to plausible
moves, and the race still decides among them on the whole model.

State is a plain dict (parent, the pending stage's plans, generation, stage, rng, history), so a
run restored from JSON between ask and tell continues identically. A failed parent measurement is
stored as inf, which Python's json writes as `Infinity` (as the journal does for failed rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Fidelity, Result, derive_seed, register
from planner.search.ilp import damage_table
from planner.search.operators import fill_uniform, level_switch, n_switches, repair
from planner.search.tied import Fusion

X = tuple[int, ...]


@dataclass(frozen=True)
class EvoConfig:
    generations: int = 50
    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((4, 512), (1, 2048))   # (survivors, tokens) per stage
    max_switches: int = 3
    same_size_only: bool = False      # EvoPress's default; off so attention and MLP can trade bits
    local_repair: bool = False        # repair at or after the earliest switched block (prefix-cache friendly)
    init_x: tuple[int, ...] | None = None   # warm start (repaired to the budget); default fill_uniform
    final_batches: int = 4            # warm start only: parent vs warm start on this many fresh batches
    screen: int = 1                   # breed screen x offspring, race the offspring with the least predicted damage
    damage: tuple[tuple[float, ...], ...] | None = None   # [unit][level] predicted damage (a sensitivity's rows)

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1 or self.max_switches < 1 or self.final_batches < 0 \
                or self.screen < 1:
            raise PlannerError("evo: generations >= 0, offspring >= 1, max_switches >= 1, final_batches >= 0 "
                               "and screen >= 1 are required")
        if not self.stages or any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in self.stages):
            raise PlannerError(f"evo: stages must be non-empty (survivors, tokens) pairs >= 1, got {self.stages}")


# Racing schedules by name (EvoConfig fields). `paper`: EvoPress's quantization defaults;
# `fast`: its "super-fast" variant; `cpu`: sized so the default run (levels build included)
# fits in 15 minutes on a 2-core CPU with the 135M default model; `refine`: a second run from a
# converged plan (--init PLAN.json): near a local optimum offspring differ from the parent by less
# than a 2048-token batch can tell apart (bench/racing_noise.py), so the last stage measures 8192
# tokens, and the screen spends the races on the moves the sensitivity finds plausible.
SCHEDULES: dict[str, dict] = {
    "paper": {"generations": 150, "offspring": 128, "stages": ((16, 2048), (4, 16384), (1, 131072))},
    "fast": {"generations": 150, "offspring": 16, "stages": ((1, 512), (1, 8192))},
    "cpu": {"generations": 30, "offspring": 16, "stages": ((4, 512), (1, 2048))},
    "refine": {"generations": 60, "offspring": 16, "stages": ((4, 512), (1, 2048), (1, 8192)), "screen": 4},
}


def _fit(r: Result) -> float:
    """Racing fitness: failed evaluations rank last."""
    return r.kl if r.ok else math.inf


@register("evo", EvoConfig)
class EvoSearcher:
    """EvoPress-style (1+lambda) evolution with multi-stage racing on fresh batches."""

    method = "evo"

    def __init__(self, problem: Problem, config: EvoConfig, seed: int):
        self.config, self.seed = config, int(seed)
        self.fusion = Fusion.of(problem)      # tied units (Problem.ties) evolve as one unit per group
        self.problem = self.fusion.inner
        self.rng = np.random.default_rng(seed)
        if config.init_x is None:
            parent = fill_uniform(self.problem, self.rng)
        else:
            if len(config.init_x) != problem.n_units:
                raise PlannerError(f"evo: init_x has {len(config.init_x)} entries, the problem has "
                                   f"{problem.n_units} units")
            parent = repair(self.fusion.to_inner(config.init_x), self.problem, self.rng)
        self.parent: X = tuple(int(v) for v in parent)
        self.start: X | None = self.parent if config.init_x is not None and config.final_batches else None
        self.parent_kl = math.inf
        self.generation = 0
        self.stage = 0
        self.pending: list[X] | None = None     # plans of the current stage; None: not bred yet
        self.history: list[tuple[int, float]] = []   # (generation, parent KL on that generation's last batch)
        if config.screen > 1 and config.damage is None:    # the pipeline fills it from --score
            raise PlannerError("evo: screen > 1 ranks offspring by predicted damage: give config 'damage' "
                               "(a sensitivity's [unit][level] rows)")
        self.table = None if config.damage is None else damage_table(problem, config.damage)

    # --- ask / tell ----------------------------------------------------------------------
    def predicted(self, x: X) -> float:
        """The sensitivity's predicted damage of an (inner) plan: the sum over units of its level's."""
        outer = self.fusion.to_outer(x)
        return float(self.table[np.arange(len(outer)), outer].sum())

    def _breed(self) -> list[X]:
        """Distinct offspring, none a copy of the parent (bounded tries: tiny spaces run dry).

        With `screen` > 1, screen x offspring are bred and the `offspring` with the least predicted
        damage race: a random switch that drops a sensitive unit to 2 bits is nearly always worse,
        and a sum over units sees that for free, so the measured evaluations go to the plausible
        moves. What the sum cannot see (errors that compound or cancel) is left to the race."""
        c, seen, out = self.config, {self.parent}, []
        want = c.offspring * c.screen
        for _ in range(20 * want):
            if len(out) == want:
                break
            k = n_switches(self.rng, c.max_switches)
            child = tuple(int(v) for v in level_switch(self.parent, self.problem, self.rng, k, c.same_size_only,
                                                   local=c.local_repair))
            if child not in seen:
                seen.add(child)
                out.append(child)
        if c.screen > 1:      # stable: equal predictions keep breeding order
            out = sorted(out, key=self.predicted)[: c.offspring]
        return out

    def _fidelity(self) -> Fidelity:
        return Fidelity(tokens=self.config.stages[self.stage][1],
                        seed=derive_seed(self.seed, self.generation, self.stage))

    def _last_stage(self) -> bool:
        return self.stage == len(self.config.stages) - 1

    def _final_check(self) -> bool:
        """All generations are done and the warm start still has to be compared with the parent."""
        return self.generation >= self.config.generations and self.start is not None and self.start != self.parent

    def _final_batch(self) -> list[Candidate]:
        g, tokens = self.config.generations, self.config.stages[-1][1]
        return [Candidate(self.fusion.to_outer(x), Fidelity(tokens=tokens, seed=derive_seed(self.seed, g, i)),
                          method=self.method, generation=g, stage=0, label=label)
                for i in range(self.config.final_batches)
                for x, label in ((self.parent, "parent"), (self.start, "warm start"))]

    def _tell_final(self, results: list[Result]) -> None:
        total = {self.parent: 0.0, self.start: 0.0}
        for r in results:
            total[self.fusion.to_inner(r.candidate.x)] += _fit(r)
        if total[self.start] < total[self.parent]:
            self.parent = self.start
        self.parent_kl = total[self.parent] / self.config.final_batches
        self.history.append((self.generation, self.parent_kl))
        self.start = None

    def ask(self) -> list[Candidate]:
        """The current stage's batch; asking again before `tell` returns the same batch."""
        if self.done():
            return []
        if self._final_check():
            return self._final_batch()
        if self.pending is None:
            self.pending = self._breed()
        f, g, s = self._fidelity(), self.generation, self.stage
        out = [Candidate(self.fusion.to_outer(x), f, method=self.method, generation=g, stage=s) for x in self.pending]
        if self._last_stage():
            out.append(Candidate(self.fusion.to_outer(self.parent), f, method=self.method, generation=g, stage=s,
                                 label="parent"))
        return out

    def upcoming(self) -> list[Fidelity]:
        """The fidelities of the batches after the one `ask` returns now, nearest first: the rest of
        this generation's stages, then the next generation's first. They depend on no result (a
        stage's windows derive from the seed, the generation and the stage), so an executor may make
        their references while this batch runs (planner/distributed: prefetch). The final check's
        batches are left out: whether it runs depends on the last generation's results."""
        if self.done() or self._final_check():
            return []
        out = [Fidelity(tokens=t, seed=derive_seed(self.seed, self.generation, s))
               for s, (_, t) in enumerate(self.config.stages) if s > self.stage]
        if self.generation + 1 < self.config.generations:
            out.append(Fidelity(tokens=self.config.stages[0][1], seed=derive_seed(self.seed, self.generation + 1, 0)))
        return out

    def tell(self, results: list[Result]) -> None:
        if self._final_check():
            return self._tell_final(results)
        if self.pending is None:
            raise PlannerError("evo: tell() before ask()")
        fit = {self.fusion.to_inner(r.candidate.x): _fit(r) for r in results}
        # stable sort: ties keep breeding order, so the run is deterministic
        ranked = sorted(self.pending, key=lambda x: fit.get(x, math.inf))
        keep = ranked[: self.config.stages[self.stage][0]]
        if not self._last_stage():
            self.pending = keep
            self.stage += 1
            return
        parent_kl = fit.get(self.parent, math.inf)
        if keep and fit.get(keep[0], math.inf) < parent_kl:
            self.parent, parent_kl = keep[0], fit[keep[0]]
        self.parent_kl = parent_kl
        self.history.append((self.generation, parent_kl))
        self.generation += 1
        self.stage = 0
        self.pending = None

    def done(self) -> bool:
        return self.generation >= self.config.generations and not self._final_check()

    def best(self) -> X | None:
        return self.fusion.to_outer(self.parent)

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "parent": list(self.parent), "parent_kl": self.parent_kl,
                "start": None if self.start is None else list(self.start),
                "generation": self.generation, "stage": self.stage,
                "pending": None if self.pending is None else [list(x) for x in self.pending],
                "rng": self.rng.bit_generator.state,
                "history": [[g, kl] for g, kl in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.parent = tuple(int(v) for v in state["parent"])
        self.parent_kl = float(state["parent_kl"])
        start = state.get("start")       # absent in checkpoints written before the final check existed
        self.start = None if start is None else tuple(int(v) for v in start)
        self.generation, self.stage = int(state["generation"]), int(state["stage"])
        pending = state["pending"]
        self.pending = None if pending is None else [tuple(int(v) for v in x) for x in pending]
        self.rng.bit_generator.state = state["rng"]
        self.history = [(int(g), float(kl)) for g, kl in state["history"]]

