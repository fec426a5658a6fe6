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
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls(**json.loads(Path(path).read_text()))


def schemes(db: LevelsDB) -> dict[str, str]:
    """level id -> what decides its speed: bits, group size and symmetry (not how codes were chosen)."""
    from planner.space import LevelSpec, Method

    out = {}
    for d in db.manifest["space"]["levels"]:
        spec = LevelSpec(Method(d["method"]), int(d["bits"]), int(d["group_size"]), bool(d.get("symmetric", False)))
        out[spec.id] = f"b{spec.bits}-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"
    return out


def unit_shape(db: LevelsDB, unit: str) -> tuple[int, int]:
    return tuple(db.manifest["units"][unit]["shape"])


@torch.no_grad()
def measure_table(model: nn.Module, problem: Problem, db: LevelsDB, batches: tuple[int, ...] = (1,),
                  reps: int = 10, table: LatencyTable | None = None) -> LatencyTable:
    """Time every distinct (shape, scheme) of the problem and the dense linears at each batch size,
    and the model's time outside its planned linears, in the model's dtype on its device."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    table = table or LatencyTable(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads())
    scheme = schemes(db)
    todo: dict[tuple[tuple[int, int], str], tuple[str, str]] = {}
    for i, u in enumerate(problem.units):
        shape = unit_shape(db, u)
        todo.setdefault((shape, DENSE), (u, ""))
        for level in problem.levels[i]:
            todo.setdefault((shape, scheme[level]), (u, level))
    for (shape, kind), (u, level) in todo.items():
        dense = model.get_submodule(u)
        mod = dense if kind == DENSE else PackedLinear.from_quantized(db.load(u, level), dense.bias).to(device)
        nbytes = dense.weight.numel() * dense.weight.element_size() if kind == DENSE else mod.weight_nbytes
        for b in batches:
            x = torch.randn(b, shape[1], dtype=dtype, device=device)
            table.rows[table.key(shape, kind, b)] = {"seconds": median_seconds(lambda m=mod, x=x: m(x), reps),
                                                       "bytes": nbytes}
    vocab = model.config.vocab_size
    for b in batches:
        ids = torch.randint(vocab, (1, b), device=device)   # one sequence of b tokens: the prefill shape
        whole = median_seconds(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), max(3, reps // 2))
        linears = sum(table.seconds(unit_shape(db, u), DENSE, b) for u in problem.units)
        table.rest[str(b)] = max(whole - linears, 0.0)
    return table


def latency_costs(table: LatencyTable, problem: Problem, db: LevelsDB, batch: int) -> np.ndarray:
    """[U, L] seconds of each unit at each level (NaN where a ladder is shorter), like Problem.unit_cost."""
    scheme = schemes(db)
    out = np.full((problem.n_units, max(len(lad) for lad in problem.levels)), np.nan)
    for i, u in enumerate(problem.units):
        out[i, :len(problem.levels[i])] = [table.seconds(unit_shape(db, u), scheme[lv], batch) for lv in problem.levels[i]]
    return out


def predict(table: LatencyTable, problem: Problem, db: LevelsDB, x, batch: int) -> float:
    """Predicted seconds of one forward of `batch` tokens (one sequence) for the plan with level vector `x`."""
    cost = latency_costs(table, problem, db, batch)
    return table.rest[str(batch)] + float(sum(cost[i, int(v)] for i, v in enumerate(x)))
