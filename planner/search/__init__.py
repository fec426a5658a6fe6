"""Searchers over a Problem's integer level vectors, registered by method name.

    searcher = make_searcher("evo", problem, {"generations": 100, "stages": [[4, 512], [1, 2048]]}, seed=0)
    run_search(searcher, problem, evaluate, run)

Configs arrive as JSON dicts and decode only into the registered frozen dataclass: unknown keys
and wrongly typed values are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search import bisect, evo, ilp, lagrange, moe_lp, nsga2, tpe, uniform  # noqa: F401  (registration)
from planner.search.base import REGISTRY, Candidate, Fidelity, Result, Searcher, register
from planner.search.loop import resume_journal, run_search

__all__ = ["REGISTRY", "Candidate", "Fidelity", "Result", "Searcher", "register", "make_config", "make_searcher",
           "run_search", "resume_journal"]


def _coerce(value, hint, where: str):
    """JSON value -> the annotated type (lists become tuples); raise TypeError on a mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise TypeError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise TypeError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def make_config(name: str, config: dict | None = None):
    """Build the frozen config registered for `name` from a JSON dict (missing keys: defaults)."""
    if name not in REGISTRY:
        raise PlannerError(f"unknown search method {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name].config_cls
    config = dict(config or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise PlannerError(f"unknown {name} config key(s) {', '.join(unknown)}: valid keys are "
                           f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in config.items()})
    except (TypeError, ValueError) as e:
        raise PlannerError(f"invalid {name} config: {e}") from None


def make_searcher(name: str, problem: Problem, config: dict | None = None, seed: int = 0) -> Searcher:
    """The registered searcher `name` on `problem`, its config decoded from a JSON dict."""
    return REGISTRY[name].factory(problem, make_config(name, config), seed)
