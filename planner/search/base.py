"""The searcher interface (optuna-style ask/tell) and the registry of searchers.

Searchers see only a `Problem` and integer level vectors; they never import torch or the model.
Every searcher has a frozen config dataclass registered under its method name, so run configs
are JSON that decodes only into registered classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from planner.problem import Problem


@dataclass(frozen=True)
class Fidelity:
    """How a fitness is measured: `tokens` from the search pool, windows chosen by `seed`."""

    tokens: int
    seed: int


@dataclass(frozen=True)
class Candidate:
    x: tuple[int, ...]
    fidelity: Fidelity
    method: str = ""
    generation: int = 0
    stage: int = 0
    label: str = ""                # human label for reports ("uniform 2", "mix 1/2 by-block-asc", "parent")
    predicted: float | None = None  # a proxy searcher's predicted damage; journaled as Row.extra["predicted"]


@dataclass(frozen=True)
class Result:
    candidate: Candidate
    kl: float = math.inf           # fitness: KL to the base model (lower is better)
    ppl: float = math.inf
    error: str | None = None       # a failed evaluation: tell() must accept it

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.kl)


def derive_seed(run_seed: int, *path: int) -> int:
    """A data seed derived from the run seed and a path such as (generation, stage).

    Fresh windows per (generation, stage) without storing them: a resumed run re-derives the same
    seeds, and two searchers with the same run seed see the same data at the same point.
    """
    return int(np.random.SeedSequence(int(run_seed), spawn_key=tuple(int(p) for p in path)).generate_state(1)[0])


class Searcher(Protocol):
    def ask(self) -> list[Candidate]: ...
    def tell(self, results: list[Result]) -> None: ...
    def done(self) -> bool: ...
    def best(self) -> tuple[int, ...] | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Registered:
    name: str
    config_cls: type
    factory: Callable[[Problem, object, int], Searcher]   # (problem, config, seed) -> searcher
    summary: str = ""


REGISTRY: dict[str, Registered] = {}


def register(name: str, config_cls: type, summary: str = "") -> Callable:
    """Class decorator: `@register("evo", EvoConfig)` on a searcher whose __init__(problem, config, seed)."""
    def deco(cls):
        REGISTRY[name] = Registered(name, config_cls, cls, summary or (cls.__doc__ or "").strip().split("\n")[0])
        return cls
    return deco

