"""Uniform baselines and best two-level mixes: the plans every searcher has to beat.

One ask, one tell. (a) every single level applied to all units; (b) for the two adjacent levels
(l, l+1) that bracket the budget, several fixed orders of which units get l+1, each filled
greedily to the budget. The mixes answer "is a search worth it, or does a one-line rule do?"
(on SmolLM2 a one-line attention-first rule beat a same-size-only EvoPress run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Fidelity, Result, derive_seed, register
from planner.search.tied import Fusion

# Substrings of a unit kind that mark attention (everything else counts as MLP / experts).
_ATTENTION_MARKS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")
_SEED_PATH = 0x5EED  # uniform's data-seed path, apart from evo's (generation, stage) paths


@dataclass(frozen=True)
class UniformConfig:
    tokens: int = 2048
    include_over_budget: bool = False   # also measure uniform levels above the budget (for Pareto plots)

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise PlannerError(f"uniform: tokens must be positive, got {self.tokens}")


def is_attention(kind: str) -> bool:
    k = kind.lower()
    return any(m in k for m in _ATTENTION_MARKS)


def uniform_x(problem: Problem, level: int) -> np.ndarray:
    """Level index `level` on every unit, clipped to each unit's ladder."""
    return np.minimum(level, problem.n_levels - 1).astype(np.int64)


def _orders(problem: Problem, seed: int) -> dict[str, np.ndarray]:
    """Named, deterministic orders in which units receive the higher level."""
    idx = np.arange(problem.n_units)
    block = np.asarray(problem.blocks if problem.blocks else idx)
    orders = {
        "by-block-asc": np.lexsort((idx, block)),
        "by-block-desc": np.lexsort((idx, -block)),
        "largest-first": np.lexsort((idx, -problem.numel)),
    }
    # sandwich: the outermost blocks first (first and last, then second and second-to-last, ...)
    orders["sandwich"] = np.lexsort((idx, np.minimum(block - block.min(), block.max() - block)))
    if problem.kinds:
        attn = np.array([is_attention(k) for k in problem.kinds])
        orders["attention-first"] = np.lexsort((idx, block, ~attn))
        orders["mlp-first"] = np.lexsort((idx, block, attn))
        # the rule of thumb that beat same-size-only EvoPress on the default model
        down = np.array(["down" in k.lower() for k in problem.kinds])
        orders["attention+down-first"] = np.lexsort((idx, block, ~(attn | down)))
    orders["random"] = np.random.default_rng(seed).permutation(problem.n_units)
    return orders


def greedy_mix(problem: Problem, low: int, order: np.ndarray, high_level: int | None = None) -> np.ndarray:
    """Start at `low` everywhere; raise units to `high_level` (default low+1) in `order` while the budget holds."""
    x = uniform_x(problem, low)
    high = uniform_x(problem, low + 1 if high_level is None else high_level)
    for u in order:
        old, x[u] = x[u], high[u]
        if not problem.feasible(x):
            x[u] = old
    return x


@register("uniform", UniformConfig)
class UniformSearcher:
    """Uniform levels and the best mixes of two adjacent levels; done after one batch."""

    method = "uniform"

    def __init__(self, problem: Problem, config: UniformConfig, seed: int):
        self.problem, self.config = problem, config
        self.fusion = Fusion.of(problem)      # tied units (Problem.ties) mix as one unit per group
        self._seed(seed)
        self.results: list[tuple[tuple[int, ...], float]] = []
        self.told = False

    def _seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.fidelity = Fidelity(tokens=self.config.tokens, seed=derive_seed(seed, _SEED_PATH))
        self.candidates = self._plan_candidates(seed)

    def _plan_candidates(self, seed: int) -> list[Candidate]:
        p, seen, out = self.fusion.inner, set(), []

        def add(x: np.ndarray, label: str) -> None:
            t = self.fusion.to_outer(x)
            if t not in seen:
                seen.add(t)
                out.append(Candidate(t, self.fidelity, method=self.method, label=label))

        top = int(p.n_levels.max()) - 1
        fitting = [lv for lv in range(top + 1) if p.feasible(uniform_x(p, lv))]
        for lv in range(top + 1):
            if lv in fitting or self.config.include_over_budget:
                add(uniform_x(p, lv), f"uniform {lv}")
        if fitting and fitting[-1] < top:
            low = fitting[-1]
            pairs = [(low, low + 1)]
            if low >= 1 and greedy_mix(p, low, np.arange(p.n_units), low + 1).tolist() == uniform_x(p, low).tolist():
                pairs.append((low - 1, low + 1))   # the budget sits on level `low`: rules need a wider pair
            for lo, hi in pairs:
                for name, order in _orders(p, derive_seed(seed, _SEED_PATH, 1)).items():
                    add(greedy_mix(p, lo, order, hi), f"mix {lo}/{hi} {name}")
        return out

    def ask(self) -> list[Candidate]:
        return [] if self.told else list(self.candidates)

    def tell(self, results: list[Result]) -> None:
        self.results += [(tuple(r.candidate.x), r.kl if r.ok else math.inf) for r in results]
        self.told = True

    def done(self) -> bool:
        return self.told

    def best(self) -> tuple[int, ...] | None:
        ok = [(kl, x) for x, kl in self.results if math.isfinite(kl) and self.problem.feasible(x)]
        return min(ok)[1] if ok else None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "told": self.told, "results": [[list(x), kl] for x, kl in self.results]}

    def load_state_dict(self, state: dict) -> None:
        self._seed(state["seed"])
        self.told = bool(state["told"])
        self.results = [(tuple(int(v) for v in x), float(kl)) for x, kl in state["results"]]


