"""The scheduling layer: hands tasks to idle workers, longest first, takes them back in whatever
order they finish, and retries the tasks of a worker that died.

Backend-agnostic (ActorPool-style): a `Backend` submits a payload to worker i and waits for any
of the futures in flight. `RayBackend` (ray_executor.py) uses actors; `simulate.py` uses threads
that sleep, to measure this layer alone with many workers. No torch, no Ray here.

A worker that dies (the backend raises `WorkerLost`) loses only its task in flight: the task goes
back to the front of the queue and runs on the next idle worker, which may be the same worker
once Ray has restarted it. A worker that died more than `max_restarts` times is retired; a task
that was in flight on `max_attempts` deaths is given up (its candidates become failed results,
which the searcher accepts: a plan that kills every worker must not stall the search).

Fillers (`Filler`): work worth doing only on a worker that would otherwise idle in a run's tail,
the next stage's base-model references (ray_executor.py). Handed out once the queue is empty and
only when expected to end about when the run's last task does (the task costs the caller gives,
in seconds learned from the tasks timed so far), never retried, and never waited for: one still
running when the last task is done keeps its worker busy into the next run().
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from planner.errors import PlannerError


class WorkerLost(Exception):
    """The worker process died (or became unreachable) while it held a task."""


class WorkersLost(PlannerError):
    """Every worker died and none can be restarted."""


class Backend(Protocol):
    def submit(self, worker: int, payload) -> object: ...
    def wait(self, futures: list) -> list: ...      # at least one done future
    def result(self, future): ...                     # the output, or raise WorkerLost


@dataclass
class WorkerStats:
    """What one worker did, cumulative over the executor's life."""

    worker: int
    pid: int = 0
    node: str = ""
    device: str = ""
    tasks: int = 0
    tokens: int = 0          # candidate-tokens scored (a plan on 2048 tokens counts 2048)
    busy_s: float = 0.0      # seconds the worker reported computing
    deaths: int = 0
    retired: bool = False

    def row(self, wall_s: float) -> dict:
        return {**asdict(self), "wall_s": round(wall_s, 3), "busy_s": round(self.busy_s, 3),
                "utilisation": round(self.busy_s / wall_s, 4) if wall_s > 0 else 0.0,
                "tokens_per_s": round(self.tokens / wall_s, 1) if wall_s > 0 else 0.0}


@dataclass(frozen=True)
class Done:
    """What a backend's `result` returns: the task's output plus accounting."""

    output: object
    seconds: float           # compute time measured on the worker
    tokens: int
    pid: int = 0


# how far past the last task in flight a filler may be expected to run: half its length. A filler makes
# one window's reference (~1.2 forwards with its publish) and saves the next stage 0.8 (a fetch instead
# of the forward); running 0.6 into that stage on one worker (which is cut around it: `busy`) costs less
FILLER_SLACK = 1 / 2


@dataclass(frozen=True)
class Filler:
    payload: object
    cost: float              # estimated, in the units of the tasks' costs


@dataclass(frozen=True)
class _InFlight:
    task: int | None         # None: a filler
    worker: int
    cost: float
    start: float             # the dispatcher's clock when handed out


class Dispatcher:
    def __init__(self, workers: int, max_restarts: int = 2, max_attempts: int = 3,
                 seconds_per_cost: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.stats = [WorkerStats(i) for i in range(workers)]
        self.max_restarts, self.max_attempts = max_restarts, max_attempts
        self.wall_s = 0.0        # seconds spent inside run(): the time the pool had work
        self.on_submit: Callable[[int, int], None] | None = None   # (worker, task index): tests, logging
        self.log: Path | None = None     # workers.jsonl: one row per worker after every run()
        self.calls = 0
        self.clock = clock           # seconds; a simulation's stops while its driver plans
        self._filling: dict[object, _InFlight] = {}    # fillers still running after the last run()
        # seconds measured and cost estimated, summed over tasks given a cost; `seconds_per_cost`, a prior
        # worth one unit of cost (a simulation's known scale: a search times the uniform baselines first)
        self._timed = (seconds_per_cost or 0.0, 1.0 if seconds_per_cost else 0.0)

    @property
    def live(self) -> list[int]:
        return [s.worker for s in self.stats if not s.retired]

    def seconds_per_cost(self) -> float | None:
        """Seconds the workers took per unit of estimated cost, over every timed task so far."""
        seconds, cost = self._timed
        return seconds / cost if cost > 0 else None

    def busy(self) -> list[float]:
        """How much longer each worker still making a filler is expected to take, in units of cost."""
        rate, now = self.seconds_per_cost(), self.clock()
        return [max(0.0, f.cost - (now - f.start) / rate) for f in self._filling.values()] if rate else []

    def run(self, backend: Backend, payloads: Sequence, order: Sequence[int],
            on_done: Callable[[int, object], None] | None = None, costs: Sequence[float] | None = None,
            filler: Sequence[Filler] = ()) -> dict[int, object | WorkerLost]:
        """Run every payload once; returns task index -> output (or the WorkerLost that ended it
        after `max_attempts`). `order` is the submission order (longest first); `costs`, the tasks'
        estimated costs, time them (and let `filler` in: see the module's docstring)."""
        t0 = self.clock()
        queue, spare = deque(order), deque(filler)
        inflight: dict[object, _InFlight] = self._filling      # task None: a filler
        self._filling = {}
        idle = deque(w for w in self.live if w not in {f.worker for f in inflight.values()})
        attempts = dict.fromkeys(range(len(payloads)), 0)
        out: dict[int, object | WorkerLost] = {}
        try:
            while queue or any(f.task is not None for f in inflight.values()):
                self._hand_out(backend, payloads, costs, queue, spare, idle, inflight)
                if not inflight:
                    raise WorkersLost(f"all {len(self.stats)} workers died more than {self.max_restarts} times each; "
                                      "the run dir keeps every finished evaluation: resume with --resume")
                for f in backend.wait(list(inflight)):
                    held = inflight.pop(f)
                    t, w = held.task, held.worker
                    try:
                        done = backend.result(f)
                    except WorkerLost as e:
                        self._died(w, idle)
                        if t is None:
                            continue
                        attempts[t] += 1
                        if attempts[t] < self.max_attempts:
                            queue.appendleft(t)
                        else:
                            out[t] = e
                        continue
                    s = self.stats[w]
                    s.tasks, s.tokens, s.busy_s, s.pid = s.tasks + 1, s.tokens + done.tokens, s.busy_s + done.seconds, done.pid
                    if held.cost > 0:
                        self._timed = (self._timed[0] + done.seconds, self._timed[1] + held.cost)
                    idle.append(w)
                    if t is None:
                        continue
                    out[t] = done.output
                    if on_done is not None:
                        on_done(t, done.output)
        finally:
            self._filling = {f: held for f, held in inflight.items() if held.task is None}
            self.wall_s += self.clock() - t0
            self.calls += 1
            self._write_log()
        return out

    def _hand_out(self, backend: Backend, payloads: Sequence, costs: Sequence[float] | None, queue: deque,
                  spare: deque, idle: deque, inflight: dict) -> None:
        """Tasks to idle workers in queue order; once the queue is empty, fillers in order while the next
        one is expected to end by the last task's expected end (plus FILLER_SLACK of its own length)."""
        while idle and queue:
            w, t = idle.popleft(), queue.popleft()
            inflight[backend.submit(w, payloads[t])] = _InFlight(t, w, costs[t] if costs else 0.0, self.clock())
            if self.on_submit is not None:
                self.on_submit(w, t)
        rate = self.seconds_per_cost()
        while idle and spare and rate is not None:
            ends = [f.start + f.cost * rate for f in inflight.values() if f.task is not None]
            if not ends or self.clock() + (1 - FILLER_SLACK) * spare[0].cost * rate > max(ends):
                return
            w, fill = idle.popleft(), spare.popleft()
            inflight[backend.submit(w, fill.payload)] = _InFlight(None, w, fill.cost, self.clock())

    def _died(self, w: int, idle: deque) -> None:
        s = self.stats[w]
        s.deaths += 1
        if s.deaths > self.max_restarts:
            s.retired = True
        else:
            idle.append(w)      # the backend restarts it; calls made meanwhile wait for the restart

    def _write_log(self) -> None:
        if self.log is None:
            return
        stamp = {"call": self.calls, "time": round(time.time(), 3)}
        with open(self.log, "a") as f:
            f.writelines(json.dumps({**stamp, **row}) + "\n" for row in self.rows())

    def rows(self) -> list[dict]:
        return [s.row(self.wall_s) for s in self.stats]

    def summary(self) -> str:
        """One line for a progress bar: per worker tokens/s and utilisation."""
        w = max(self.wall_s, 1e-9)
        parts = [f"w{s.worker} {s.tokens / w:.0f}t/s {100 * s.busy_s / w:.0f}%" + ("x" * s.deaths)
                 for s in self.stats if not s.retired]
        return " | ".join(parts)
