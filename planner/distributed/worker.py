"""What runs inside one worker process (a Ray actor): its own model and in-process evaluator,
built once, scoring the tasks the driver sends. Plain Python; ray_executor.py wraps it in an actor.

The model is loaded from the folder the driver loaded (the cached safetensors conversion for the
default model; a shared filesystem on a multi-node cluster), the levels DB is opened from its
path (a folder of per-unit safetensors files). A task is a chunk of candidates on a run of windows,
sent as forward batches that each lie inside one of the in-process evaluator's batches; the worker
scores one batch at a time and returns every window's KL and NLL sums, which the driver adds up
(tasks.fold) exactly as the in-process evaluator does.

References (references.py): a task that produces its windows' references is preceded, on the same
actor, by a `reference` call that makes them and returns each window's base-model hidden states
as its own object; a task that consumes them gets those objects' refs in `Work.shared` and turns
each into a reference with the head when its first KL needs it (its anchor pass and first plan run
meanwhile). If the producer died, the consumer makes the reference itself: same numbers either way.
A worker left idle in a batch's tail may get a `prefetch` call instead: the `reference` call alone,
for windows of a batch to come, whose tasks then all fetch them.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from planner.data.windows import Windows
from planner.distributed.dispatch import Done
from planner.distributed.references import PendingReference, from_wire, reference_nbytes, to_wire
from planner.evaluate.evaluator import InProcessEvaluator
from planner.evaluate.kl import Reference, reference
from planner.levels.db import LevelsDB
from planner.model.load import load_model
from planner.plan import Plan
from planner.problem import Problem

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class WorkerSpec:
    model: str                  # a local folder (shared storage on a cluster) or a hub id
    db_path: str
    windows: Windows
    dtype: str = "bf16"
    kl_topk: int | None = None
    threads: int = 1            # torch threads of a CPU worker: one per core it was given, never all cores
    trust_remote_code: bool = False
    cache_bytes: float | None = None   # dequantized levels kept (LRU); None: all on CPU, half the free memory on GPU


@dataclass(frozen=True)
class Work:
    """One task: `xs` (level vectors) on `batches` (window indices, one array per forward batch, each
    within one in-process batch); with `xs` None, the single `plan` (None: the base model) instead.
    `publish`: windows whose references this task makes for others (the driver's backend sends the
    `reference` call first); `shared`: (window, ObjectRef) of references made elsewhere."""

    xs: tuple[tuple[int, ...], ...] | None
    batches: tuple[np.ndarray, ...]
    plan: Plan | None = None
    publish: tuple[int, ...] = ()
    shared: tuple[tuple[int, object], ...] = ()

    @property
    def windows(self) -> list[int]:
        return [int(w) for idx in self.batches for w in idx]


@dataclass(frozen=True)
class Prefetch:
    """A filler (dispatch.Filler): make and publish the references of `windows`, which a later batch
    scores (the next stages' windows, announced by the searcher), on a worker idle in this batch's tail."""

    windows: tuple[int, ...]


@dataclass(frozen=True)
class Output:
    sums: np.ndarray            # [windows, plans, 2]: KL and NLL sums; nan where a plan failed
    errors: dict[int, str]      # plan position -> error text
    made: int = 0               # references made by a base-model forward on this worker (since its last task)
    fetched: int = 0            # references made from hidden states another worker published


class _Shared:
    """The evaluator's reference source on a worker: `fetch` (window -> ObjectRef, or the array itself)
    holds the current task's references made elsewhere, handed out pending; while `publish` is a
    dict, the hidden states of the references made here are collected into it."""

    def __init__(self, ev: _WindowSums):
        self.ev = ev
        self.fetch: dict[int, object] = {}
        self.publish: dict[int, np.ndarray] | None = None
        self.n_made = self.n_fetched = 0     # since the worker's last report

    def get(self, window: int) -> PendingReference | None:
        handle = self.fetch.pop(window, None)
        return None if handle is None else PendingReference(partial(self.ev.resolve, window, handle), self.ev.ref_nbytes)

    def made(self, window: int, hidden: torch.Tensor) -> None:
        self.n_made += 1
        if self.publish is not None:
            self.publish[window] = to_wire(hidden)


class _WindowSums(InProcessEvaluator):
    """The in-process evaluator, keeping each window's KL and NLL sums (`scored`: one list per batch
    a plan was scored on, in order), so the driver can add up windows scored on different workers
    in the in-process order; its references can come from other workers (`shared`)."""

    def __init__(self, *args, **kwargs):
        self.shared = _Shared(self)
        self._plan: Plan | None = None     # the plan applied now (a reference resolved mid-plan needs the base)
        super().__init__(*args, references=self.shared, **kwargs)
        self.scored: list[list[tuple[float, float]]] = []
        self.ref_nbytes = reference_nbytes(self.windows.seqlen, self.model.get_output_embeddings().weight.shape[0],
                                           self.kl_topk)

    def apply(self, plan: Plan | None) -> None:
        super().apply(plan)
        self._plan = plan

    @contextmanager
    def _base_weights(self):
        plan = self._plan
        if plan is not None:
            self.apply(None)
        try:
            yield
        finally:
            if plan is not None:
                self.apply(plan)

    @torch.no_grad()
    def resolve(self, window: int, handle) -> Reference:
        """A shared window's reference: its published hidden states through the base model's head
        (the in-process evaluator's kernels on the same bits); made here if its producer failed."""
        data = _fetch(handle)
        with self._base_weights():
            if data is None:
                self.shared.n_made += 1
                hidden = self._hidden(np.array([window]))[0]
            else:
                self.shared.n_fetched += 1
                hidden = from_wire(data, self.dtype, self.windows.ids.device)
            return reference(self.model.get_output_embeddings()(hidden), self.kl_topk)

    def publish(self, windows: np.ndarray) -> list[np.ndarray]:
        """The base model's final hidden states of `windows`, each window's reference made here on the
        way (again if this worker had it: the states are kept only while being published)."""
        for w in windows:
            self._ref.pop(int(w), None)
        self.shared.publish = {}
        try:
            self._reference(windows)
            return [self.shared.publish[int(w)] for w in windows]
        finally:
            self.shared.publish = None

    def _window_scores(self, idx: np.ndarray, hidden: torch.Tensor) -> tuple[float, float]:
        per = []
        for j in range(len(idx)):        # one window at a time, as the in-process loop does
            per.append(super()._window_scores(idx[j:j + 1], hidden[j:j + 1]))
        self.scored.append(per)
        kl = nll = 0.0
        for k, n in per:
            kl, nll = kl + k, nll + n
        return kl, nll


class _DeviceDB:
    """A levels DB whose dequantized weights live on the worker's device in an LRU of `budget`
    bytes, none kept on the host: LevelsDB caches every level of every unit it reads (6 bf16
    levels: 12 bytes a weight, 84 GB for Llama-3-8B), which no GPU holds. A plan touches few units
    beyond its parent's, so the working set is small; a miss reads the unit's file and dequantizes
    just the level asked for."""

    def __init__(self, db: LevelsDB, device: torch.device, budget: float):
        self._db, self._device, self.budget = db, device, budget
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.nbytes = self.misses = 0

    def __getattr__(self, name):
        return getattr(self._db, name)

    def weight(self, unit: str, level: str, dtype: torch.dtype) -> torch.Tensor:
        key = (unit, level, dtype)
        if key not in self._cache:
            self.misses += 1
            w = self._db.load(unit, level).dequantize(dtype).to(self._device)
            self._cache[key] = w
            self.nbytes += w.numel() * w.element_size()
            while self.nbytes > self.budget and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self.nbytes -= old.numel() * old.element_size()
        self._cache.move_to_end(key)
        return self._cache[key]


class EvalWorker:
    def __init__(self, spec: WorkerSpec):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(spec.model, torch.float32, spec.trust_remote_code).model.to(self.device)
        db = LevelsDB(spec.db_path)
        budget = spec.cache_bytes
        if budget is None and self.device.type == "cuda":
            budget = 0.5 * torch.cuda.mem_get_info()[0]
        self.db = db if budget is None else _DeviceDB(db, self.device, budget)
        w = spec.windows     # ids arrive read-only from the object store: a private (device) copy
        self.windows = Windows(w.ids.to(self.device, copy=True), w.calib, w.heldout, w.pool)
        self._key: str | None = None
        self._ev: _WindowSums | None = None
        self._reference_s = 0.0     # time spent in `reference` calls, reported with the next task

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname(), "device": str(self.device),
                "threads": torch.get_num_threads()}

    def _evaluator(self, key: str, problem: Problem) -> _WindowSums:
        if key != self._key:      # a new problem (budget, ties): the model and DB stay loaded
            self._ev = _WindowSums(self.model, self.db, problem, self.windows, dtype=DTYPES[self.spec.dtype],
                                      kl_topk=self.spec.kl_topk)
            self._key = key
        return self._ev

    def reference(self, key: str, problem: Problem, windows: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The references of `windows`, made here for the task that follows on this actor, and their
        hidden states for the other tasks on those windows: one object per window (the caller sets
        Ray's `num_returns` to the number of windows), so a consumer fetches only its own."""
        t0 = time.perf_counter()
        out = self._evaluator(key, problem).publish(np.array(windows))
        self._reference_s += time.perf_counter() - t0
        return out[0] if len(out) == 1 else tuple(out)

    def prefetch(self, key: str, problem: Problem, windows: np.ndarray) -> tuple:
        """`reference` as a task of its own (a Prefetch): its Done first, then one object per window
        (the caller sets Ray's `num_returns` to one more than the number of windows)."""
        t0 = time.perf_counter()
        out = self._evaluator(key, problem).publish(np.array(windows))
        return (Done(None, time.perf_counter() - t0, 0, os.getpid()), *out)

    def run(self, key: str, problem: Problem, work: Work) -> Done:
        t0 = time.perf_counter()
        ev = self._evaluator(key, problem)
        n = 1 if work.xs is None else len(work.xs)
        sums = np.full((sum(len(idx) for idx in work.batches), n, 2), np.nan)
        errors: dict[int, str] = {}
        row = 0
        ev.shared.fetch = dict(work.shared)
        try:
            for idx in work.batches:
                idx = np.array(idx)        # writable: arrays from the object store are read-only
                if work.xs is None:     # a single plan (held-out, `planner eval`): errors are the caller's
                    ev.scored.clear()
                    ev.score(work.plan, idx)
                    per_plan = list(ev.scored)
                else:
                    per_plan = _score_many(ev, work.xs, idx, errors)
                for i, per in enumerate(per_plan):
                    if per is not None:
                        sums[row:row + len(idx), i] = per
                row += len(idx)
        finally:
            ev.shared.fetch = {}
        out = Output(sums, errors, ev.shared.n_made, ev.shared.n_fetched)
        ev.shared.n_made = ev.shared.n_fetched = 0
        seconds, self._reference_s = time.perf_counter() - t0 + self._reference_s, 0.0
        return Done(out, seconds, len(sums) * ev.windows.seqlen * n, os.getpid())


def _fetch(handle) -> np.ndarray | None:
    """A published window's hidden states (an ObjectRef, or the array itself), or None when its
    producer failed (died, or raised)."""
    if isinstance(handle, np.ndarray):
        return handle
    import ray

    try:
        return ray.get(handle)
    except ray.exceptions.RayError:
        return None


def _score_many(ev: _WindowSums, xs, idx: np.ndarray, errors: dict[int, str]) -> list[list | None]:
    """Per plan, its windows' sums on one batch: score_many, and on failure one plan at a time (one
    bad plan must not fail its siblings: the in-process evaluator's rule, applied per batch)."""
    ev.scored.clear()
    try:
        ev.score_many(list(xs), idx)
        return list(ev.scored)
    except (RuntimeError, ValueError):
        out: list[list | None] = []
        for i, x in enumerate(xs):
            ev.scored.clear()
            try:
                ev.score(ev.problem.decode(x), idx)
                out.append(ev.scored[0])
            except (RuntimeError, ValueError) as e:     # e.g. out of memory: the searcher decides
                errors.setdefault(i, f"{type(e).__name__}: {e}")
                out.append(None)
        return out
