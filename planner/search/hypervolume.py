"""Objectives of a multi-objective search, and the hypervolume of what it found (numpy only).

Every objective is minimized: KL to the base model, and sizes (bits, bpw, bytes; `size` means the
budget's own currency) or hardware costs (latency, memory: the problem must carry them, see
planner/runtime/hardware.py). The budget stays an upper bound: plans over it are outside the front.

For the hypervolume every objective is mapped onto [0, 1] with fixed ends, so numbers from
different methods and runs of one problem compare:
- KL on a log scale from KL_FLOOR (1e-3 nats, the bf16 noise floor: smaller KLs say nothing) to
  KL_REF (10 nats: a broken model; uniform 2-bit RTN on the default model is 12);
- a size from the cheapest plan to the budget (the budget's metric) or to the dearest plan (others);
  latency and memory from their lowest to their highest value over all plans.
The reference point lies a margin past the box, at (1.1, ..., 1.1), so that plans exactly on the
budget (where a single-objective search puts them) still count; `plans_hypervolume` divides by
1.1^d, so it lies in [0, 1].
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import numpy as np

from planner.budget import HARDWARE, Metric
from planner.errors import PlannerError
from planner.problem import Problem

KL_FLOOR = 1e-3
KL_REF = 10.0
REF = 1.1           # reference point on every normalized axis


class Objective(str, enum.Enum):
    KL = "kl"
    BITS = "bits"
    BPW = "bpw"
    BYTES = "bytes"
    SIZE = "size"          # the budget's metric
    LATENCY = "latency"    # predicted seconds of a decode step (needs the problem's latency costs)
    MEMORY = "memory"      # bytes of the whole packed model (needs the problem's memory costs)


def parse_objectives(names: Iterable[str]) -> tuple[Objective, ...]:
    """Validated objectives: KL first, then distinct sizes; `size` is kept symbolic until `resolve`."""
    try:
        objs = tuple(Objective(str(n).strip().lower()) for n in names)
    except ValueError:
        raise PlannerError(f"unknown objective in {list(names)!r}: choose from "
                           f"{', '.join(o.value for o in Objective)} (kl first)") from None
    if not objs or objs[0] is not Objective.KL or Objective.KL in objs[1:] or len(set(objs)) != len(objs):
        raise PlannerError(f"objectives must start with kl and not repeat, e.g. kl, kl,size, kl,bits,bpw or kl,latency; "
                           f"got {','.join(o.value for o in objs)}")
    return objs


def resolve(objectives: Sequence[Objective | str], problem: Problem) -> tuple[Metric, ...]:
    """The size metrics of `objectives` (`size` -> the budget's metric), duplicates dropped."""
    out: list[Metric] = []
    for o in map(Objective, objectives[1:]):
        m = problem.budget.metric if o is Objective.SIZE else Metric(o.value)
        if m not in out:
            out.append(m)
    return tuple(out)


def setup(method: str, problem: Problem, objectives: Iterable[str], init_xs: Sequence) -> tuple:
    """(objectives, size metrics, fusion, seed plans) of a population searcher. Tied units are
    searched as the fused problem (`fusion.inner`; its moves change one unit at a time, so each tie
    group becomes one unit) and the seed plans mapped onto it; a seed plan of the wrong length or a
    hardware objective the problem has no costs for is an error."""
    from planner.search.tied import Fusion

    for x in init_xs:
        if len(x) != problem.n_units:
            raise PlannerError(f"{method}: a seed plan has {len(x)} entries, the problem has {problem.n_units} units")
    objs = parse_objectives(objectives)
    metrics = resolve(objs, problem)
    missing = [m.value for m in metrics if m in HARDWARE and m not in problem.hardware]
    if missing:
        raise PlannerError(f"{method}: objective {missing[0]} needs the problem's {missing[0]} costs "
                           "(planner.runtime.hardware.attach_hardware; the CLI attaches them for --objectives)")
    fusion = Fusion.of(problem)
    return objs, metrics, fusion, tuple(fusion.to_inner(x) for x in init_xs)


def size_bounds(problem: Problem, metric: Metric) -> tuple[float, float]:
    """(cheapest plan, budget) in `metric` for the budget's metric; (cheapest, dearest) otherwise."""
    if metric in HARDWARE:          # need not grow along a ladder: the extremes over all plans
        lo, hi = problem.extent(metric)
        return lo, max(hi, lo * (1 + 1e-9) + 1e-12)
    lo = problem.cost(np.zeros(problem.n_units, dtype=np.int64)).value(metric)
    if metric is problem.budget.metric:
        hi = problem.budget.value
    else:
        hi = problem.cost(problem.n_levels - 1).value(metric)
    return lo, max(hi, lo * (1 + 1e-9) + 1e-12)


def normalize(problem: Problem, metrics: Sequence[Metric], kl, sizes: Sequence) -> np.ndarray:
    """[N, 1 + len(metrics)] points on the unit scale above (values past 1 lie outside the box)."""
    kl = np.asarray(kl, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = (np.log10(np.maximum(kl, KL_FLOOR)) - np.log10(KL_FLOOR)) / (np.log10(KL_REF) - np.log10(KL_FLOOR))
    cols = [np.where(np.isfinite(kl), k, np.inf)]
    for m, s in zip(metrics, sizes, strict=True):
        lo, hi = size_bounds(problem, m)
        cols.append((np.asarray(s, dtype=np.float64) - lo) / (hi - lo))
    return np.stack(cols, axis=1) if len(kl) else np.zeros((0, 1 + len(metrics)))


def nondominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (all <=, one <); duplicates keep one."""
    P = np.asarray(points, dtype=np.float64)
    keep = np.ones(len(P), dtype=bool)
    for i in range(len(P)):
        if not keep[i]:
            continue
        le = (P <= P[i]).all(axis=1)
        dominates_i = le & (P < P[i]).any(axis=1)
        same = le & (P == P[i]).all(axis=1)
        same[: i + 1] = False
        if dominates_i.any():
            keep[i] = False
        keep &= ~same                              # later copies of point i go
    return keep


def hypervolume(points: np.ndarray, ref: np.ndarray | None = None) -> float:
    """Volume dominated by `points` and bounded by `ref` (default all ones); minimization.

    2-D by a sweep; more dimensions by slicing along the last one (HSO), plenty for fronts of a
    few hundred plans and 2-3 objectives."""
    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 2 or len(P) == 0:
        return 0.0
    ref = np.ones(P.shape[1]) if ref is None else np.asarray(ref, dtype=np.float64)
    P = P[(P < ref).all(axis=1)]
    if len(P) == 0:
        return 0.0
    P = P[nondominated(P)]
    if P.shape[1] == 1:
        return float(ref[0] - P[:, 0].min())
    if P.shape[1] == 2:
        P = P[np.argsort(P[:, 0])]              # non-dominated: second coordinate falls
        xs = np.append(P[1:, 0], ref[0])
        return float(((xs - P[:, 0]) * (ref[1] - P[:, 1])).sum())
    P = P[np.argsort(P[:, -1])]
    zs = np.append(P[1:, -1], ref[-1])
    return float(sum((zs[i] - P[i, -1]) * hypervolume(P[: i + 1, :-1], ref[:-1]) for i in range(len(P))))


def points_hypervolume(problem: Problem, metrics: Sequence[Metric], kl, sizes: Sequence) -> float:
    """Hypervolume of measured points (KL and one size column per metric) on `problem`'s scale."""
    d = 1 + len(metrics)
    return hypervolume(normalize(problem, metrics, kl, sizes), np.full(d, REF)) / REF**d


def plans_hypervolume(problem: Problem, objectives: Sequence[Objective | str], xs: Sequence, kls: Sequence) -> float:
    """Hypervolume of plans (level vectors with their KL) on `objectives` of `problem`."""
    metrics = resolve(objectives, problem) or (problem.budget.metric,)
    costs = [problem.cost(x) for x in xs]
    return points_hypervolume(problem, metrics, kls, [[c.value(m) for c in costs] for m in metrics])
