"""The searcher interface (optuna-style ask/tell) and the registry of searchers.

Searchers see only a `Problem` and integer level vectors; they never import torch or the model.
Every searcher has a frozen config dataclass registered under its method name, so run configs
are JSON that decodes only into registered classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

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


@dataclass(frozen=True)
class Result:
    candidate: Candidate
    kl: float = math.inf           # fitness: KL to the base model (lower is better)
    ppl: float = math.inf
    error: str | None = None       # a failed evaluation: tell() must accept it

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.kl)


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

