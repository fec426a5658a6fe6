"""Hardware limits and objectives for a search: latency and memory costs attached to the Problem.

    spec = HardwareSpec(max_latency=0.005, max_memory=60e6)       # planner.budget; seconds, bytes
    problem = attach_hardware(session, problem, spec)              # costs attached, limits in the budget

Once attached they are costs like bits or bytes (`Problem.unit_cost`, `Problem.limit`), so repair,
the ILP, evo, nsga2 and tpe keep them without knowing what they mean.

- latency: one decode step of `batch` tokens (batch 1: one token of one sequence) on the evaluating
  device, predicted from the latency table (runtime/latency.py). The table is measured once per
  (device, dtype, threads) and cached as JSON next to the levels DB; a later search measures only
  the rows it lacks (another batch size, another space's levels).
- memory: bytes of the whole packed model: each planned unit's stored bytes (codes, scales, zeros,
  masks) plus every other parameter (embeddings, norms, lm_head, biases) at 16 bits, as
  `planner export --format packed` writes them.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planner.budget import Budget, HardwareSpec, Metric
from planner.errors import BadBudget
from planner.problem import HwCost, Problem
from planner.runtime.latency import LatencyTable, latency_costs, measure_table

UNPLANNED_BYTES_PER_WEIGHT = 2      # fp16 / bf16: how a packed export stores what the plan does not compress


def device_slug(model: nn.Module) -> str:
    """A file-name-safe name of where and how the model runs: device model, dtype, threads."""
    p = next(model.parameters())
    name = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else (platform.processor() or platform.machine())
    threads = f"-t{torch.get_num_threads()}" if p.device.type == "cpu" else ""
    text = f"{p.device.type}-{name}-{str(p.dtype).removeprefix('torch.')}{threads}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def table_path(db_path: Path, model: nn.Module) -> Path:
    return Path(db_path) / "latency" / f"{device_slug(model)}.json"


def _entries(table: LatencyTable) -> tuple[int, int, int]:
    return len(table.rows), len(table.rest), len(table.kinds)


def cached_table(model: nn.Module, problem: Problem, db, batch: int, reps: int = 10) -> LatencyTable:
    """The device's latency table from the cache next to the levels DB, measuring (and saving) only
    the rows this problem needs that it lacks (and the row kinds of its levels, which cost DB reads)."""
    path = table_path(db.path, model)
    table = LatencyTable.load(path) if path.is_file() else None
    before = None if table is None else _entries(table)
    table = measure_table(model, problem, db, batches=(batch,), reps=reps, table=table)
    if before != _entries(table):
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table


def unplanned_bytes(model: nn.Module, problem: Problem) -> float:
    """Bytes of every parameter the plan does not compress (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())      # parameters() yields a shared tensor once
    return float(total - problem.total_numel) * UNPLANNED_BYTES_PER_WEIGHT


def attach_hardware(session, problem: Problem, spec: HardwareSpec, saved: dict[Metric, HwCost] | None = None) -> Problem:
    """`problem` with the latency and memory costs `spec` needs (`saved` ones as they are: a resumed
    run's) and its limits added to the budget; BadBudget when no plan meets every limit at once."""
    metrics = spec.metrics()
    if not metrics:
        return problem
    model = session.loaded.model
    for metric, hw in (saved or {}).items():
        if metric in metrics:
            problem = problem.with_hardware(metric, hw.table, hw.base)
    if Metric.LATENCY in metrics and Metric.LATENCY not in problem.hardware:
        from planner.pipeline import DTYPES

        model.to(DTYPES[session.spec.dtype])       # timed in the dtype the evaluator runs
        table = cached_table(model, problem, session.db, spec.batch, spec.reps)
        problem = problem.with_hardware(Metric.LATENCY, latency_costs(table, problem, session.db, spec.batch),
                                        table.rest[str(spec.batch)])
    if Metric.MEMORY in metrics and Metric.MEMORY not in problem.hardware:
        problem = problem.with_hardware(Metric.MEMORY, problem.stored_bits / 8.0, unplanned_bytes(model, problem))
    if spec.limits():
        b = problem.budget
        problem = dataclasses.replace(problem, budget=Budget(b.value, b.metric, (*b.also, *spec.limits())), _index={})
    check_limits(problem)
    return problem


def check_limits(problem: Problem) -> None:
    """Each limit alone (Problem.check_budget), then all of them at once: a plan of 3 bits can be too
    slow for a latency limit that a 4-bit plan meets, so every limit can be reachable and no plan
    meet them all."""
    from planner.search.ilp import make_items, solve_mckp

    problem.check_budget()
    if not problem.budget.also:
        return
    items = make_items(problem, np.where(np.isnan(problem.code_bits), np.nan, 0.0))
    if solve_mckp(items, problem.budget_total()) is None:
        raise BadBudget(f"no plan meets every limit of {problem.budget} at once: relax one of them")
