"""The scheduling layer with simulated workers: threads that sleep for a task's estimated cost.

What is real here: the task planning (`tasks.split`), the dispatcher (longest first, unordered
completion, stats), the threads' hand-offs. What is simulated: the evaluation itself (a sleep of
`cost x unit_s`, the cost in full forwards of one window from `tasks.CostModel`: the reference
and the anchor's pass of every task's windows, its plans' suffixes, a fixed cost per forward call
and per task) and the candidates (level vectors made like EvoPress offspring: 1-3 level switches
of two units each). A worker's reference cache is not credited (a task is charged the references
of its windows even where its worker made them for an earlier task), so the numbers are a floor.
Ray's own per-task overhead (about a millisecond) is measured by bench/ray_scaling.py, section 3.

Efficiencies reported per worker count W, against one worker running the in-process evaluator
(one task per fidelity group: one reference per window, one anchor pass, every plan's suffix):

    granularity  in-process work / (W x planned makespan): what the task grid allows at best
    dispatch     planned makespan / measured wall time: what this layer loses on top
    overall      in-process work / (W x measured wall) = speedup / W
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass

import numpy as np

from planner.distributed.dispatch import Dispatcher, Done
from planner.distributed.tasks import CostModel, Task, lpt_makespan, lpt_order, split


@dataclass(frozen=True)
class Stage:
    candidates: int      # plans measured together (one fidelity group)
    windows: int         # token windows of that fidelity (the evaluator scores them 4 to a batch)


def evo_stages(offspring: int, stages: tuple[tuple[int, int], ...], seqlen: int) -> list[Stage]:
    """One EvoPress generation: the offspring race, then the survivors; the parent joins the last stage."""
    out, k = [], offspring
    for i, (survivors, tokens) in enumerate(stages):
        out.append(Stage(k + (i == len(stages) - 1), -(-tokens // seqlen)))
        k = survivors
    return out


# EvoPress quantization defaults (128 offspring; 16@2048 -> 4@16384 -> 1@131072 tokens) on
# windows of 2048 tokens; the CPU schedule of this repo on the default model (512-token windows).
SCHEDULES = {
    "paper": evo_stages(128, ((16, 2048), (4, 16384), (1, 131072)), 2048),
    "cpu": evo_stages(16, ((4, 512), (1, 2048)), 512),
}


def offspring(rng: np.random.Generator, n_units: int, k: int, levels: int = 5) -> np.ndarray:
    """A parent (the middle level) and k - 1 children with 1-3 switches of two units each."""
    parent = np.full(n_units, levels // 2)
    X = [parent]
    for _ in range(k - 1):
        x = parent.copy()
        units = rng.choice(n_units, size=2 * rng.integers(1, 4), replace=False)
        x[units[0::2]] += 1
        x[units[1::2]] -= 1
        X.append(x)
    return np.array(X)


class SleepBackend:
    """Worker i is a thread that sleeps for its task's cost times `unit_s`."""

    def __init__(self, workers: int, unit_s: float):
        self.unit_s = unit_s
        self.pool = cf.ThreadPoolExecutor(max_workers=workers)

    def _run(self, task: Task) -> Done:
        t0 = time.perf_counter()
        time.sleep(task.cost * self.unit_s)
        return Done(task, time.perf_counter() - t0, tokens=0)

    def submit(self, worker: int, task: Task):
        return self.pool.submit(self._run, task)

    def wait(self, futures: list) -> list:
        return list(cf.wait(futures, return_when=cf.FIRST_COMPLETED).done)

    def result(self, future):
        return future.result()

    def close(self) -> None:
        self.pool.shutdown()


@dataclass(frozen=True)
class SimResult:
    workers: int
    tasks: int
    inprocess: float     # one worker, one task per group (seconds of work)
    planned: float       # LPT makespan of the chosen tasks
    wall: float          # measured
    busy: float          # sum of the workers' sleeps

    @property
    def granularity(self) -> float:
        return self.inprocess / (self.workers * self.planned)

    @property
    def dispatch(self) -> float:
        return self.planned / self.wall

    @property
    def overall(self) -> float:
        return self.inprocess / (self.workers * self.wall)


def simulate(stages: list[Stage], workers: int, unit_s: float = 0.01, generations: int = 1,
             n_blocks: int = 32, units_per_block: int = 7, head_blocks: float = 2.4, seed: int = 0,
             atom: int = 1, reference: float = 1.0, sleep: bool = True) -> SimResult:
    """Run `generations` of `stages` through the dispatcher on `workers` sleeping threads, `unit_s`
    seconds per full forward of one window; `atom` 4 keeps tasks on whole batches; `reference` is
    the cost of a window's reference (0: as if every worker had them). With `sleep` False only the
    plan is made (wall = planned: the granularity alone, at no cost)."""
    rng = np.random.default_rng(seed)
    cost = CostModel(np.repeat(np.arange(n_blocks), units_per_block), n_blocks, head_blocks, reference=reference)
    backend, dispatcher = SleepBackend(workers, unit_s), Dispatcher(workers)
    n_tasks, inproc, planned, busy = 0, 0.0, 0.0, 0.0
    try:
        for _ in range(generations):
            for st in stages:
                X = offspring(rng, n_blocks * units_per_block, st.candidates)
                inproc += cost.inprocess(X, st.windows) * unit_s
                tasks = split(0, X, st.windows, workers, cost, atom)
                n_tasks += len(tasks)
                planned += lpt_makespan([t.cost * unit_s for t in tasks], workers)
                if sleep:
                    dispatcher.run(backend, tasks, lpt_order(tasks))
        busy = sum(s.busy_s for s in dispatcher.stats)
    finally:
        backend.close()
    return SimResult(workers, n_tasks, inproc, planned, dispatcher.wall_s if sleep else planned, busy)
