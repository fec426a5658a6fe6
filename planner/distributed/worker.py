"""What runs inside one worker process (a Ray actor): its own model and in-process evaluator,
built once, scoring the tasks the driver sends. Plain Python; ray_executor.py wraps it in an actor.

The model is loaded from the folder the driver loaded (the cached safetensors conversion for the
default model; a shared filesystem on a multi-node cluster), the levels DB is opened from its
path (a folder of per-unit safetensors files). A task is a chunk of candidates on a run of windows,
sent as forward batches that each lie inside one of the in-process evaluator's batches; the worker
scores one batch at a time and returns every window's KL and NLL sums, which the driver adds up
(tasks.fold) exactly as the in-process evaluator does.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from planner.data.windows import Windows
from planner.distributed.dispatch import Done
from planner.evaluate.evaluator import InProcessEvaluator
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
    within one in-process batch); with `xs` None, the single `plan` (None: the base model) instead."""

    xs: tuple[tuple[int, ...], ...] | None
    batches: tuple[np.ndarray, ...]
    plan: Plan | None = None


@dataclass(frozen=True)
class Output:
    sums: np.ndarray            # [windows, plans, 2]: KL and NLL sums; nan where a plan failed
    errors: dict[int, str]      # plan position -> error text


class _WindowSums(InProcessEvaluator):
    """The in-process evaluator, keeping each window's KL and NLL sums (`scored`: one list per batch
    a plan was scored on, in order), so the driver can add up windows scored on different workers
    in the in-process order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored: list[list[tuple[float, float]]] = []

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

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname(), "device": str(self.device),
                "threads": torch.get_num_threads()}

    def _evaluator(self, key: str, problem: Problem) -> _WindowSums:
        if key != self._key:      # a new problem (budget, ties): the model and DB stay loaded
            self._ev = _WindowSums(self.model, self.db, problem, self.windows, dtype=DTYPES[self.spec.dtype],
                                      kl_topk=self.spec.kl_topk)
            self._key = key
        return self._ev

    def run(self, key: str, problem: Problem, work: Work) -> Done:
        t0 = time.perf_counter()
        ev = self._evaluator(key, problem)
        n = 1 if work.xs is None else len(work.xs)
        sums = np.full((sum(len(idx) for idx in work.batches), n, 2), np.nan)
        errors: dict[int, str] = {}
        row = 0
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
        tokens = len(sums) * ev.windows.seqlen * n
        return Done(Output(sums, errors), time.perf_counter() - t0, tokens, os.getpid())


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
