"""Hardware-aware costs: a latency/memory table per (unit shape, level, device, batch rows), measured
on the evaluating device through the packed runtime, and plan latency predicted from it.

    table = measure_table(model, problem, db, batches=(1, 512))   # seconds on the default model
    table.save(path); table = LatencyTable.load(path)
    seconds = predict(table, problem, db, x, batch=1)             # one forward of `batch` tokens
    cost = latency_costs(table, problem, db, batch=1)             # [U, L] seconds, like unit_cost

A prediction is additive: the measured time of the model's dense forward minus its planned linears
(embeddings, attention, norms, lm_head: `rest`), plus each unit's measured packed-linear time at
its level. Levels that share (shape, bits, group size, symmetry) share a row, so a GPTQ and an RTN
level of one shape cost one measurement. Additivity ignores cache effects between layers; the bench
checks it against an end-to-end measurement (bench/kernels_cpu.py).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planner.errors import PlannerError
from planner.levels.db import LevelsDB
from planner.problem import Problem
from planner.runtime.packed import PackedLinear

DENSE = "dense"


def median_seconds(fn, reps: int) -> float:
    """Median wall time of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class LatencyTable:
    device: str
    dtype: str
    threads: int
    rows: dict[str, dict] = field(default_factory=dict)     # key -> {"seconds": s, "bytes": b}
    rest: dict[str, float] = field(default_factory=dict)    # str(batch) -> seconds outside the planned linears

    @staticmethod
    def key(shape: tuple[int, int], scheme: str, batch: int) -> str:
        return f"{shape[0]}x{shape[1]}|{scheme}|{batch}"

    def seconds(self, shape: tuple[int, int], scheme: str, batch: int) -> float:
        return self.rows[self.key(shape, scheme, batch)]["seconds"]

    def save(self, path: str | Path) -> None:
        """Atomically (temp file + rename): a search reading the cached table never sees half of it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls(**json.loads(Path(path).read_text()))


_SCHEME = re.compile(r"^(?:gptq|rtn)-b(\d+)-(?:g(\d+)|pc)(-sym)?$")


class NoKernel(PlannerError):
    """A unit or level the packed runtime cannot time (no kernel for it), so no latency table."""


def scheme_of(level: str) -> str | None:
    """What decides an integer-grid level's speed: bits, group size and symmetry (not how its codes
    were chosen); None for a level the packed runtime has no kernel for (pruned, dropped, GGUF)."""
    m = _SCHEME.match(level)
    if m is None:
        return None
    return f"b{m.group(1)}-g{m.group(2) or 0}-{'sym' if m.group(3) else 'asym'}"


def schemes(db: LevelsDB) -> dict[str, str]:
    """level id -> scheme, for every level of the DB with a packed kernel (gptq / rtn grids)."""
    return {lv.id: sc for u in db.units for lv in db.levels(u) if (sc := scheme_of(lv.id)) is not None}


def unit_shape(db: LevelsDB, unit: str) -> tuple[int, int]:
    return tuple(db.manifest["units"][unit]["shape"])


def _scheme(level: str, unit: str) -> str:
    sc = scheme_of(level)
    if sc is None:
        raise NoKernel(f"level {level!r} of {unit} has no packed kernel to time (latency tables cover gptq/rtn "
                       "integer levels): drop the latency limit/objective or search a gptq/rtn space")
    return sc


def _members(problem: Problem, i: int) -> tuple[str, ...]:
    return problem.members[i] if problem.members else (problem.units[i],)


@torch.no_grad()
def measure_table(model: nn.Module, problem: Problem, db: LevelsDB, batches: tuple[int, ...] = (1,),
                  reps: int = 10, table: LatencyTable | None = None) -> LatencyTable:
    """Time every distinct (shape, scheme) of the problem and the dense linears at each batch size,
    and the model's time outside its planned linears, in the model's dtype on its device.
    Rows already in `table` are kept, not measured again (a cached table grows)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    table = table or LatencyTable(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads())
    todo: dict[tuple[tuple[int, int], str], tuple[str, str]] = {}
    for i in range(problem.n_units):
        for u in _members(problem, i):
            shape = unit_shape(db, u)
            todo.setdefault((shape, DENSE), (u, ""))
            for level in problem.levels[i]:
                todo.setdefault((shape, _scheme(level, u)), (u, level))
    for (shape, kind), (u, level) in todo.items():
        missing = [b for b in batches if table.key(shape, kind, b) not in table.rows]
        if missing:
            _time_linear(model, db, u, level, shape, kind, missing, reps, table)
    vocab = model.config.vocab_size
    for b in (b for b in batches if str(b) not in table.rest):
        ids = torch.randint(vocab, (1, b), device=device)   # one sequence of b tokens (b = 1: a decode step)
        whole = median_seconds(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), max(3, reps // 2))
        linears = sum(table.seconds(unit_shape(db, u), DENSE, b) for u in problem.model_units)
        table.rest[str(b)] = max(whole - linears, 0.0)
    return table


def _time_linear(model: nn.Module, db: LevelsDB, unit: str, level: str, shape: tuple[int, int], kind: str,
                 batches: list[int], reps: int, table: LatencyTable) -> None:
    """One (shape, scheme) row per batch size, timed on `unit` (dense, or packed at `level`)."""
    dense = model.get_submodule(unit)
    if not isinstance(dense, nn.Linear):
        raise NoKernel(f"{unit} is a {type(dense).__name__}, not a Linear: the latency table times linears only")
    device, dtype = dense.weight.device, dense.weight.dtype
    try:
        mod = dense if kind == DENSE else PackedLinear.from_quantized(db.load(unit, level), dense.bias).to(device)
        nbytes = dense.weight.numel() * dense.weight.element_size() if kind == DENSE else mod.weight_nbytes
        for b in batches:
            x = torch.randn(b, shape[1], dtype=dtype, device=device)
            table.rows[table.key(shape, kind, b)] = {"seconds": median_seconds(lambda m=mod, x=x: m(x), reps),
                                                      "bytes": nbytes}
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as e:
        raise NoKernel(f"no {device.type} kernel runs {kind} on a {shape[0]}x{shape[1]} weight ({unit}, level "
                       f"{level}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def latency_costs(table: LatencyTable, problem: Problem, db: LevelsDB, batch: int) -> np.ndarray:
    """[U, L] seconds of each unit at each level (NaN where a ladder is shorter), like Problem.unit_cost;
    a fused unit costs the sum of its members."""
    out = np.full((problem.n_units, max(len(lad) for lad in problem.levels)), np.nan)
    for i in range(problem.n_units):
        out[i, :len(problem.levels[i])] = [sum(table.seconds(unit_shape(db, u), _scheme(lv, u), batch)
                                               for u in _members(problem, i)) for lv in problem.levels[i]]
    return out


def predict(table: LatencyTable, problem: Problem, db: LevelsDB, x, batch: int) -> float:
    """Predicted seconds of one forward of `batch` tokens (one sequence) for the plan with level vector `x`."""
    cost = latency_costs(table, problem, db, batch)
    return table.rest[str(batch)] + float(sum(cost[i, int(v)] for i, v in enumerate(x)))
