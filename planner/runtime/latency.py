"""Hardware-aware costs: a latency/memory table per (unit shape, level, device, batch rows), measured
on the evaluating device through the packed runtime, and plan latency predicted from it.

    table = measure_table(model, problem, db, batches=(1, 512))   # seconds on the default model
    table.save(path); table = LatencyTable.load(path)
    seconds = predict(table, problem, db, x, batch=1)             # one forward of `batch` tokens
    cost = latency_costs(table, problem, db, batch=1)             # [U, L] seconds, like unit_cost

A prediction is additive: the measured time of the model's dense forward minus its planned linears
(embeddings, attention, norms, lm_head: `rest`), plus each unit's measured time at its level of the
module the runtime runs for it (`runtime_linear`: a PackedLinear on the kernels, or a DequantLinear
that dequantizes its stored payload at every forward). Rows are keyed by that module's kind
(`runtime_kind`): a kernel scheme (bits, group size, symmetry), so a GPTQ and an RTN level of one
shape cost one measurement, or `dequant:<stored format>` (e.g. `dequant:gguf Q4_K`). Additivity
ignores cache effects between layers; the bench checks it against an end-to-end measurement
(bench/kernels_cpu.py).
"""

from __future__ import annotations

import json
import os
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
from planner.runtime.packed import runtime_kind, runtime_linear

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
    kinds: dict[str, str] = field(default_factory=dict)     # "unit|level" -> row kind (runtime_kind): a DB read saved

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


class NoKernel(PlannerError):
    """A unit or level the runtime cannot run, so no latency row (a unit that is no Linear, a level
    the levels DB lacks, a kernel that fails on the device)."""


def unit_shape(db: LevelsDB, unit: str) -> tuple[int, int]:
    return tuple(db.manifest["units"][unit]["shape"])


def kind_of(table: LatencyTable, db: LevelsDB, unit: str, level: str) -> str:
    """The row kind of `unit` at `level`: the kind of module the runtime builds for it (`runtime_kind`),
    remembered in the table, since deciding it reads the level from the DB."""
    key = f"{unit}|{level}"
    if key not in table.kinds:
        if unit not in db.manifest["units"] or level not in {lv.id for lv in db.levels(unit)}:
            raise NoKernel(f"the levels DB has no level {level!r} for {unit}: no runtime module to time")
        table.kinds[key] = runtime_kind(db.load(unit, level), level)
    return table.kinds[key]


def _linear(model: nn.Module, unit: str) -> nn.Linear:
    try:
        module = model.get_submodule(unit)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        what = "not a module" if module is None else f"a {type(module).__name__}"
        raise NoKernel(f"{unit} is {what}, not a Linear: the latency table times linears only (the runtime "
                       "replaces linears)")
    return module


def _members(problem: Problem, i: int) -> tuple[str, ...]:
    return problem.members[i] if problem.members else (problem.units[i],)


@torch.no_grad()
def measure_table(model: nn.Module, problem: Problem, db: LevelsDB, batches: tuple[int, ...] = (1,),
                  reps: int = 10, table: LatencyTable | None = None) -> LatencyTable:
    """Time every distinct (shape, kind) of the problem and the dense linears at each batch size, and
    the model's time outside its planned linears, in the model's dtype on its device.
    Rows already in `table` are kept, not measured again (a cached table grows)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    table = table or LatencyTable(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads())
    todo: dict[tuple[tuple[int, int], str], tuple[str, str]] = {}
    for i in range(problem.n_units):
        for u in _members(problem, i):
            _linear(model, u)
            shape = unit_shape(db, u)
            todo.setdefault((shape, DENSE), (u, ""))
            for level in problem.levels[i]:
                todo.setdefault((shape, kind_of(table, db, u, level)), (u, level))
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
    """One (shape, kind) row per batch size, timed on `unit`: dense, or the module the runtime builds
    for it at `level` (a PackedLinear, or a DequantLinear that dequantizes at every call)."""
    dense = _linear(model, unit)
    device, dtype = dense.weight.device, dense.weight.dtype
    try:
        mod = dense if kind == DENSE else runtime_linear(db.load(unit, level), dense.bias, level=level).to(device)
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
        out[i, :len(problem.levels[i])] = [sum(table.seconds(unit_shape(db, u), kind_of(table, db, u, lv), batch)
                                               for u in _members(problem, i)) for lv in problem.levels[i]]
    return out


def predict(table: LatencyTable, problem: Problem, db: LevelsDB, x, batch: int) -> float:
    """Predicted seconds of one forward of `batch` tokens (one sequence) for the plan with level vector `x`."""
    cost = latency_costs(table, problem, db, batch)
    return table.rest[str(batch)] + float(sum(cost[i, int(v)] for i, v in enumerate(x)))
