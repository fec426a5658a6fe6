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


class Dispatcher:
    def __init__(self, workers: int, max_restarts: int = 2, max_attempts: int = 3):
        self.stats = [WorkerStats(i) for i in range(workers)]
        self.max_restarts, self.max_attempts = max_restarts, max_attempts
        self.wall_s = 0.0        # seconds spent inside run(): the time the pool had work
        self.on_submit: Callable[[int, int], None] | None = None   # (worker, task index): tests, logging
        self.log: Path | None = None     # workers.jsonl: one row per worker after every run()
        self.calls = 0

    @property
    def live(self) -> list[int]:
        return [s.worker for s in self.stats if not s.retired]

    def run(self, backend: Backend, payloads: Sequence, order: Sequence[int],
            on_done: Callable[[int, object], None] | None = None) -> dict[int, object | WorkerLost]:
        """Run every payload once; returns task index -> output (or the WorkerLost that ended it
        after `max_attempts`). `order` is the submission order (longest first)."""
        t0 = time.perf_counter()
        queue, idle = deque(order), deque(self.live)
        attempts = dict.fromkeys(range(len(payloads)), 0)
        inflight: dict[object, tuple[int, int]] = {}
        out: dict[int, object | WorkerLost] = {}
        try:
            while queue or inflight:
                while queue and idle:
                    w, t = idle.popleft(), queue.popleft()
                    inflight[backend.submit(w, payloads[t])] = (t, w)
                    if self.on_submit is not None:
                        self.on_submit(w, t)
                if not inflight:
                    raise WorkersLost(f"all {len(self.stats)} workers died more than {self.max_restarts} times each; "
                                      "the run dir keeps every finished evaluation: resume with --resume")
                for f in backend.wait(list(inflight)):
                    t, w = inflight.pop(f)
                    try:
                        done = backend.result(f)
                    except WorkerLost as e:
                        self._died(w, idle)
                        attempts[t] += 1
                        if attempts[t] < self.max_attempts:
                            queue.appendleft(t)
                        else:
                            out[t] = e
                        continue
                    s = self.stats[w]
                    s.tasks, s.tokens, s.busy_s, s.pid = s.tasks + 1, s.tokens + done.tokens, s.busy_s + done.seconds, done.pid
                    idle.append(w)
                    out[t] = done.output
                    if on_done is not None:
                        on_done(t, done.output)
        finally:
            self.wall_s += time.perf_counter() - t0
            self.calls += 1
            self._write_log()
        return out

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
